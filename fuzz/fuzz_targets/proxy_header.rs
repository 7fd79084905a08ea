//! The PROXY protocol header parser (v1 text and v2 binary) on any first bytes of a
//! connection: never panics; a header is never longer than the bytes, nor than the bounds;
//! reading the same bytes split anywhere never sees a different header, only an
//! incomplete one first; and a header stays the same with more bytes behind it.
//!
//! The parser is the gateway's `proxy_protocol/header.rs`, compiled in here as a module:
//! it needs only `ppp` and std, and building the whole gateway (Tokio, hyper, rustls,
//! the Redis client) with fuzzing instrumentation would cost minutes of every test run.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/reset-gateway/src/proxy_protocol/header.rs"]
#[allow(dead_code)]
mod header;

use header::{parse, Parsed, MAX_V1_LEN, MAX_V2_LEN};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Parsed::Header { len, .. } = whole {
        assert!(len <= data.len() && len <= MAX_V1_LEN.max(MAX_V2_LEN));
        // Bytes after a header (the request, the TLS hello) do not change it.
        assert_eq!(parse(&data[..len]), whole);
    }
    // A prefix is either the same answer or still incomplete: a header that arrives in
    // pieces is read as the same header.
    for end in [data.len() / 2, data.len().saturating_sub(1)] {
        let part = parse(&data[..end]);
        assert!(part == whole || part == Parsed::Incomplete, "{part:?} then {whole:?}");
    }
});
