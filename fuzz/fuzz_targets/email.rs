//! `Email::parse` on any string: never panics, and what it accepts is what it was given,
//! within the length limit, and parses again to the same address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reset_guard::internals::{Email, EmailKey, EmailKeyPolicy, EmailPolicy};

fuzz_target!(|input: &str| {
    for allow_utf8_local in [false, true] {
        let policy = EmailPolicy { allow_utf8_local };
        if let Ok(email) = Email::parse(input, policy) {
            assert_eq!(email.as_str(), input);
            assert!(input.len() <= 254);
            assert!(email.ascii_domain().is_ascii());
            assert_eq!(Email::parse(email.as_str(), policy).as_ref(), Ok(&email));
            let key = EmailKey::new(&email, EmailKeyPolicy::default());
            assert!(key.as_str().contains('@'));
        }
    }
});
