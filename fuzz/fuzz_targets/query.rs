//! The `email` query parameter on any query string: never panics; an accepted address
//! survives the upstream re-encoding unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reset_guard::internals::{email_param, encode_query_value, Email, EmailPolicy};

fuzz_target!(|query: &str| {
    if let Ok(raw) = email_param(Some(query)) {
        if let Ok(email) = Email::parse(&raw, EmailPolicy::default()) {
            let again = format!("email={}", encode_query_value(email.as_str()));
            assert_eq!(email_param(Some(&again)).as_deref(), Ok(email.as_str()));
        }
    }
});
