//! The email rules (reset-guard's `EmailError`) through the gateway: each address sent
//! percent-encoded in the query.

use crate::common::*;

/// (query value as sent, address QuickBlox must receive)
const VALID: &[(&str, &str)] = &[
    ("alice%40example.com", "alice@example.com"),
    ("alice@example.com", "alice@example.com"),
    ("Alice.Smith%40Example.COM", "Alice.Smith@Example.COM"),
    ("bob%2Btag%40gmail.com", "bob+tag@gmail.com"),
    ("bob+tag@gmail.com", "bob+tag@gmail.com"),
    ("a%40b.io", "a@b.io"),
    ("x%40sub.domain.example.co.uk", "x@sub.domain.example.co.uk"),
    ("first.last%40example.org", "first.last@example.org"),
    ("o'hara%40example.ie", "o'hara@example.ie"),
    (
        "%21%23%24%25%26'%2A%2B%2F%3D%3F%5E_%60%7B%7C%7D~-%40example.com",
        "!#$%&'*+/=?^_`{|}~-@example.com",
    ),
    ("user%2540host%40example.com", "user%40host@example.com"),
    ("a%2526b%40example.com", "a%26b@example.com"),
    ("1234567890%40example.com", "1234567890@example.com"),
    ("a-b_c%40my-domain.example", "a-b_c@my-domain.example"),
    ("x%40xn--bcher-kva.example", "x@xn--bcher-kva.example"),
    ("x%40b%C3%BCcher.example", "x@bücher.example"),
    (
        "x%40%E4%BE%8B%E3%81%88.%E3%83%86%E3%82%B9%E3%83%88",
        "x@例え.テスト",
    ),
    ("x%40EXAMPLE.COM", "x@EXAMPLE.COM"),
    ("x%40a1.b2c", "x@a1.b2c"),
    ("x%40123.example", "x@123.example"),
    (
        "x%40ddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd.com",
        "x@ddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd.com",
    ),
    (
        "llllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllll%40example.com",
        "llllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllll@example.com",
    ),
    ("x%40a.b.c.d.e.f.example", "x@a.b.c.d.e.f.example"),
    ("x.y.z%40example.com", "x.y.z@example.com"),
    ("x%40example.museum", "x@example.museum"),
    ("x%40a-b-c.example", "x@a-b-c.example"),
    ("%7Bcurly%7D%40example.com", "{curly}@example.com"),
    ("under_score%40example.com", "under_score@example.com"),
];

/// (query value as sent, why it is refused)
const INVALID: &[(&str, &str)] = &[
    ("alice", "no at"),
    ("alice%40", "empty domain"),
    ("%40example.com", "empty local"),
    ("a%40b%40example.com", "two at signs"),
    ("alice%40example", "single label"),
    (".alice%40example.com", "leading dot"),
    ("alice.%40example.com", "trailing dot"),
    ("al..ice%40example.com", "double dot"),
    ("%22alice%22%40example.com", "quoted local part"),
    ("%22a%20b%22%40example.com", "quoted with space"),
    ("alice(comment)%40example.com", "comment"),
    ("Alice%20%3Calice%40example.com%3E", "display name"),
    ("alice%40%5B127.0.0.1%5D", "IPv4 literal"),
    ("alice%40%5BIPv6%3A%3A%3A1%5D", "IPv6 literal"),
    ("alice%40127.0.0.1", "numeric TLD"),
    ("alice%40example.123", "numeric TLD 2"),
    ("%20alice%40example.com", "leading space"),
    ("alice%40example.com%20", "trailing space"),
    ("ali%20ce%40example.com", "inner space"),
    ("alice%09%40example.com", "tab"),
    ("alice%0A%40example.com", "LF"),
    ("alice%40example.com%0D%0ABcc:x@y.z", "CRLF injection"),
    ("alice%00%40example.com", "NUL"),
    ("ali%C2%ADce%40example.com", "soft hyphen"),
    ("ali%E2%80%8Bce%40example.com", "zero width space"),
    ("alice%40exa%E2%80%8Cmple.com", "ZWNJ in domain"),
    ("%EF%BB%BFalice%40example.com", "BOM"),
    ("ali%E2%81%A0ce%40example.com", "word joiner"),
    ("alice%40-example.com", "label leading hyphen"),
    ("alice%40example-.com", "label trailing hyphen"),
    ("alice%40exa_mple.com", "underscore in domain"),
    ("alice%40example..com", "empty label"),
    ("alice%40.example.com", "leading dot domain"),
    ("alice%40example.com.", "trailing dot domain"),
    ("alice%40dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd.com", "label of 64"),
    ("lllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllll%40example.com", "local of 65"),
    ("a%40ddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd.ddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd.ddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd.ddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd", "255 octets"),
    ("%C3%A9lise%40example.com", "utf8 local, not allowed"),
    ("alice%40xn--zz.example", "bad punycode"),
    ("%FF%FE%40example.com", "invalid UTF-8"),
    ("alice%2", "truncated escape"),
    ("alice%40exa%2Fmple.com", "slash in domain"),
    ("alice%40exa mple.com", "raw space"),
];

#[tokio::test]
async fn the_address_table() {
    assert!(VALID.len() + INVALID.len() >= 60);
    let gw = Gateway::start("").await;
    for (sent, expected) in VALID {
        let reply = gw.reset_as_ios(&format!("email={sent}")).await;
        assert_eq!(reply.status, 200, "{sent} should be accepted: {reply:?}");
        let seen = gw.mock.requests();
        let received = seen.last().expect("forwarded").email();
        assert_eq!(received.as_deref(), Some(*expected), "{sent}");
        gw.mock.clear_requests();
    }
    for (sent, why) in INVALID {
        let target = format!("{RESET}?email={sent}");
        let reply = gw
            .send("GET", &target, &[("QB-Token", IOS_TOKEN)], "")
            .await;
        // A raw space makes the request line itself malformed: the HTTP parser refuses it.
        let expected = if sent.contains(' ') { 400 } else { 422 };
        assert_eq!(
            reply.status, expected,
            "{sent} ({why}) should be refused: {reply:?}"
        );
        if expected == 422 {
            assert_eq!(
                reply.body, r#"{"errors":{"email":["is invalid"]}}"#,
                "{sent}"
            );
        }
    }
    assert!(
        gw.mock.requests().is_empty(),
        "an invalid address reached QuickBlox"
    );
}

#[tokio::test]
async fn utf8_local_parts_when_allowed() {
    let gw = Gateway::start("  email:\n    allow_utf8_local: true\n").await;
    let reply = gw.reset_as_ios("email=%C3%A9lise%40example.com").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        gw.mock.requests()[0].email().as_deref(),
        Some("élise@example.com")
    );
    // Invisible characters stay refused even then.
    let reply = gw
        .reset_as_ios("email=%C3%A9li%E2%80%8Bse%40example.com")
        .await;
    assert_eq!(reply.status, 422);
}
