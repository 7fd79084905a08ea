//! The scanner reads what serde_json reads: on the gateway's own lines (which it must
//! take), on hand-picked odd ones, and on generated hostile ones.

use proptest::prelude::*;

use super::*;

/// What serde_json alone makes of `line`.
fn by_serde(line: &[u8]) -> Option<AccessLine<'_>> {
    serde_json::from_slice(line).ok()
}

/// The scanner took `line` and read it as serde_json does.
fn scanned_alike(line: &str) {
    let scanned = scan(line.as_bytes()).unwrap_or_else(|| panic!("not scanned: {line}"));
    assert_eq!(Some(scanned), by_serde(line.as_bytes()), "{line}");
}

/// The scanner left `line` to serde_json.
fn left_to_serde(line: &str) {
    assert_eq!(scan(line.as_bytes()), None, "{line}");
}

const FORWARDED: &str = r#"{"timestamp":"2025-03-01T10:00:00.000001Z","level":"INFO","received_at":"2025-03-01T10:00:00.000000123Z","request_id":"0af3","guarded":true,"client_id":"ios","client_ip":"2001:db8::1","email_hash":"00abcdef01234567","outcome":"forwarded","status":200,"upstream_status":200,"upstream_ms":41.2,"duration_ms":41.5,"target":"access"}"#;

#[test]
fn the_gateways_lines_are_scanned() {
    scanned_alike(FORWARDED);
    scanned_alike(
        r#"{"timestamp":"t","level":"INFO","received_at":"r","request_id":"x","client_ip":"10.0.0.1","outcome":"rate_limited","limit":"per_ip","status":429,"duration_ms":0.013,"target":"access"}"#,
    );
    // A summary line (written by tracing's formatter: its own order of keys).
    scanned_alike(
        r#"{"timestamp":"t","level":"INFO","count":1200,"received_at":"a","last_received_at":"b","guarded":true,"client_ip":"10.0.0.1","outcome":"rate_limited","limit":"per_email","status":429,"target":"access"}"#,
    );
    scanned_alike("{}");
    scanned_alike(
        r#"{"client_id":"non-ASCII as written: é","target":null,"guarded":null,"count":null}"#,
    );
}

#[test]
fn escapes_spaces_and_odd_values_are_left_to_serde() {
    for line in [
        r#"{"client_id":"i\"os","target":"access"}"#,
        r#"{"request_id":"a\\b","target":"access"}"#,
        r#"{"target":"acc\u0065ss"}"#,
        r#"{"tar\u0067et":"access"}"#,
        "{\"client_id\":\"tab\there\",\"target\":\"access\"}",
        r#"{ "target":"access"}"#,
        r#"{"target" :"access"}"#,
        r#"{"target":"access" }"#,
        r#" {"target":"access"}"#,
        r#"{"target":"access"}x"#,
        r#"{"target":"access"},"#,
        r#"{"target":"access""#,
        r#"{"target":"access","#,
        r#"{"target":"access",}"#,
        r#"{"target":"access","target":"access"}"#,
        r#"{"target":null,"target":"access"}"#,
        r#"{"guarded":true,"guarded":true}"#,
        r#"{"target":1}"#,
        r#"{"guarded":"true"}"#,
        r#"{"guarded":1}"#,
        r#"{"count":"3"}"#,
        r#"{"count":-1}"#,
        r#"{"count":3.0}"#,
        r#"{"count":1e2}"#,
        r#"{"count":03}"#,
        r#"{"count":18446744073709551615}"#,
        r#"{"count":18446744073709551616}"#,
        r#"{"count":99999999999999999999}"#,
        r#"{"status":01}"#,
        r#"{"status":1.}"#,
        r#"{"status":-}"#,
        r#"{"status":1e}"#,
        r#"{"status":tru}"#,
        r#"{"status":nul}"#,
        r#"{"nested":{"target":"access"}}"#,
        r#"{"list":[1,2]}"#,
        r#"["access"]"#,
        r#"{"#,
        "",
    ] {
        left_to_serde(line);
    }
    // Invalid UTF-8 in any string.
    let mut line = br#"{"client_id":"ios","target":"access"}"#.to_vec();
    line[15] = 0xff;
    assert_eq!(scan(&line), None);
}

#[test]
fn numbers_and_repeats_serde_accepts_are_read_alike() {
    for line in [
        r#"{"count":0,"status":-0.5e-3,"upstream_ms":1E+2,"x":18446744073709551616}"#,
        r#"{"count":9999999999999999999}"#,
        r#"{"other":1,"other":"twice","target":"access"}"#,
        r#"{"guarded":false,"email_hash":"","limit":"per_email"}"#,
    ] {
        scanned_alike(line);
    }
}

/// A JSON value, often one the scanner leaves to serde_json.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        // Strings as the gateway writes them: escaped by serde_json.
        "[a-z\"\\\\\u{0}\u{1f}\n\t é\u{2028}\u{7f}]{0,8}"
            .prop_map(|s| serde_json::to_string(&s).unwrap()),
        // Strings written raw, control characters and quotes included.
        "[a-z0-9:.\\-\u{1}\té]{0,8}".prop_map(|s| format!("\"{s}\"")),
        Just("true".to_owned()),
        Just("false".to_owned()),
        Just("null".to_owned()),
        "-?(0|[1-9][0-9]{0,21})(\\.[0-9]{0,2})?([eE][+-]?[0-9]{0,2})?",
        "0[0-9]{1,3}",
        Just("{}".to_owned()),
        Just("[1]".to_owned()),
    ]
}

const KEYS: [&str; 14] = [
    "target",
    "received_at",
    "guarded",
    "client_ip",
    "client_id",
    "email_hash",
    "outcome",
    "limit",
    "count",
    "last_received_at",
    "timestamp",
    "status",
    "tar\\u0067et",
    "é",
];

/// A flat object of those keys in any order (repeats included), separated as the gateway
/// writes them or, now and then, with a space.
fn line() -> impl Strategy<Value = String> {
    let member = (0..KEYS.len(), value()).prop_map(|(k, v)| format!("\"{}\":{v}", KEYS[k]));
    (
        prop::collection::vec(member, 0..12),
        prop_oneof![8 => Just(""), 1 => Just(" "), 1 => Just("\n")],
    )
        .prop_map(|(members, space)| format!("{{{}}}", members.join(&format!(",{space}"))))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn generated_lines_read_alike(line in line()) {
        if let Some(scanned) = scan(line.as_bytes()) {
            prop_assert_eq!(Some(scanned), by_serde(line.as_bytes()), "{}", line);
        }
    }

    #[test]
    fn damaged_lines_read_alike(
        cuts in prop::collection::vec((0..FORWARDED.len(), any::<u8>(), 0..3u8), 1..4)
    ) {
        // The gateway's line with bytes replaced, inserted or removed.
        let mut line = FORWARDED.as_bytes().to_vec();
        for (at, byte, how) in cuts {
            let at = at.min(line.len() - 1);
            match how {
                0 => line[at] = byte,
                1 => line.insert(at, byte),
                _ => {
                    line.remove(at);
                }
            }
        }
        if let Some(scanned) = scan(&line) {
            prop_assert_eq!(Some(scanned), by_serde(&line), "{}", String::from_utf8_lossy(&line));
        }
    }
}
