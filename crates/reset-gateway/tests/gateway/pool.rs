//! The upstream pool when many requests arrive before any connection exists: over HTTP/2 they
//! share the one connection being made, over HTTP/1.1 each gets a connection of its own, and
//! a connect that fails fails each of them with a 502 rather than leaving any waiting.

use qb_mock::MockServer;
use tokio::task::JoinSet;

use crate::common::*;

const CONCURRENT: usize = 20;

/// A fresh gateway with one worker (one pool) in front of `mock`, trusting `ca_file` if given.
/// The timeouts are generous: a slow machine must not turn a wait into a 504.
async fn one_worker_gateway(mock: MockServer, ca_file: Option<&std::path::Path>) -> Gateway {
    let mut yaml = with_server_keys(&yaml(&mock.url(), "", ""), "  workers: 1\n")
        .replace("  timeout: 400ms\n", "  timeout: 20s\n")
        .replace("  connect_timeout: 400ms\n", "  connect_timeout: 20s\n");
    if let Some(ca_file) = ca_file {
        yaml = yaml.replace(
            "  pass_headers:",
            &format!("  ca_file: {}\n  pass_headers:", ca_file.display()),
        );
    }
    Gateway::start_yaml(mock, &yaml).await
}

/// `CONCURRENT` resets sent at once, each on its own client connection; their statuses.
async fn concurrent_resets(gw: &Gateway) -> Vec<u16> {
    let request = format!(
        "GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: gateway.test\r\n\
         Connection: close\r\nQB-Token: {IOS_TOKEN}\r\n\r\n"
    );
    let mut resets = JoinSet::new();
    for _ in 0..CONCURRENT {
        let (addr, request) = (gw.addr, request.clone());
        resets.spawn(async move { raw(addr, request.as_bytes()).await.status });
    }
    resets.join_all().await
}

#[tokio::test]
async fn concurrent_requests_share_the_one_http2_connection_being_made() {
    let (mock, _dir, ca_file) = tls_mock(&[b"h2", b"http/1.1"]).await;
    let gw = one_worker_gateway(mock, Some(&ca_file)).await;
    assert_eq!(
        gw.mock.connections(),
        0,
        "a fresh gateway has no connection"
    );

    let statuses = concurrent_resets(&gw).await;
    assert_eq!(statuses, vec![200; CONCURRENT]);
    assert_eq!(
        gw.mock.connections(),
        1,
        "every reset waited for the one HTTP/2 connection instead of opening its own"
    );
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), CONCURRENT);
    assert!(seen.iter().all(|r| r.version == http::Version::HTTP_2));

    // Once QuickBlox drops it, the next burst shares one new connection too (or, if it came
    // before the gateway saw the close, the old one).
    gw.mock.close_connections();
    let statuses = concurrent_resets(&gw).await;
    assert_eq!(statuses, vec![200; CONCURRENT]);
    assert!(gw.mock.connections() <= 2, "{}", gw.mock.connections());
}

#[tokio::test]
async fn concurrent_requests_over_http1_each_get_a_connection() {
    let (mock, _dir, ca_file) = tls_mock(&[b"http/1.1"]).await;
    let gw = one_worker_gateway(mock, Some(&ca_file)).await;

    let statuses = concurrent_resets(&gw).await;
    assert_eq!(statuses, vec![200; CONCURRENT]);
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), CONCURRENT);
    assert!(seen.iter().all(|r| r.version == http::Version::HTTP_11));
    // HTTP/1.1 carries one exchange at a time: never more connections than requests, and
    // (the first connect having shown HTTP/1.1) no request waits on another's connect.
    assert!(gw.mock.connections() <= CONCURRENT);

    // Kept for the next ones: a second burst needs no more than it had.
    let before = gw.mock.connections();
    let statuses = concurrent_resets(&gw).await;
    assert_eq!(statuses, vec![200; CONCURRENT]);
    assert!(gw.mock.connections() <= 2 * before);
}

#[tokio::test]
async fn a_failed_shared_connect_fails_every_waiting_request() {
    // Not trusting the mock's CA: every TLS handshake fails.
    let (mock, _dir, _ca_file) = tls_mock(&[b"h2", b"http/1.1"]).await;
    let gw = one_worker_gateway(mock, None).await;

    let statuses = concurrent_resets(&gw).await;
    // A 502 each, none left waiting for the timeout (which would be a 504).
    assert_eq!(statuses, vec![502; CONCURRENT]);
    assert!(gw.mock.connections() >= 1);
    assert!(gw.mock.requests().is_empty());
}
