//! The exactly-one-credential check on any set of headers: never panics, and a token is
//! only ever found in a single QB-Token or a single `ApiKey` Authorization.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use reset_guard::internals::presented_token;

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    // Lines of `name:value`; names are mostly the two credential headers.
    for line in data.split(|&b| b == b'\n') {
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => continue,
        };
        let name = match name {
            b"q" => HeaderName::from_static("qb-token"),
            b"a" => HeaderName::from_static("authorization"),
            other => match HeaderName::from_bytes(other) {
                Ok(name) => name,
                Err(_) => continue,
            },
        };
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }
    if presented_token(&headers).is_ok() {
        let credentials = headers.get_all("qb-token").iter().count()
            + headers.get_all("authorization").iter().count();
        assert_eq!(credentials, 1);
    }
});
