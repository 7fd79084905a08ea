//! Rate limits through the running gateway (the arithmetic is tested with a manual clock
//! in reset-guard; here: wiring, headers and what reaches QuickBlox).

use crate::common::*;

#[tokio::test]
async fn per_ip_limit_answers_429_with_the_ietf_fields() {
    let gw = Gateway::start("  limits:\n    per_ip: [{ requests: 2, per: 1h }]\n    per_client: []\n    per_email: []\n    global: []\n").await;
    for _ in 0..2 {
        assert_eq!(
            gw.reset_as_ios("email=alice%40example.com").await.status,
            200
        );
    }
    // Invalid requests are limited too once the IP's budget is spent.
    let reply = gw.reset("email=alice%40example.com", &[]).await;
    assert_eq!(reply.status, 429, "{reply:?}");
    assert_eq!(
        reply.body,
        r#"{"errors":{"base":["Too many requests, retry later"]}}"#
    );
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1799..=1800).contains(&retry), "{retry}");
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some(r#""per_ip";q=2;w=3600"#)
    );
    assert_eq!(
        reply.header("ratelimit"),
        Some(format!(r#""per_ip";r=0;t={retry}"#).as_str())
    );
    assert!(reply.header("x-request-id").is_some());
    assert_eq!(gw.mock.requests().len(), 2);
}

#[tokio::test]
async fn per_email_denial_is_indistinguishable_under_uniform_answers() {
    let gw = Gateway::start("  limits:\n    per_ip: []\n    per_client: []\n    per_email: [{ requests: 1, per: 1h }]\n    global: []\n").await;
    let first = gw.reset_as_ios("email=bob%40example.com").await;
    let limited = gw.reset_as_ios("email=Bob%2Bagain%40Example.com").await;
    assert_eq!((first.status, first.body.as_str()), (200, ""));
    assert_eq!(first.stable_headers(), limited.stable_headers());
    assert_eq!(first.body, limited.body);
    assert_eq!(
        gw.mock.requests().len(),
        1,
        "the denied reset never reached QuickBlox"
    );
}

#[tokio::test]
async fn response_headers_on_allowed_answers() {
    let gw = Gateway::start("  limits:\n    per_ip: [{ requests: 5, per: 1m }]\n    per_client: []\n    per_email: []\n    global: []\n    response_headers: true\n").await;
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some(r#""per_ip";q=5;w=60"#)
    );
    assert_eq!(reply.header("ratelimit"), Some(r#""per_ip";r=4;t=12"#));
}
