//! QuickBlox unreachable, slow or broken: 502 and 504 with the JSON body, and the
//! gateway keeps serving.

use std::time::Duration;

use qb_mock::{Failure, MockServer};

use crate::common::*;

const UNAVAILABLE: &str = r#"{"errors":{"base":["Upstream unavailable"]}}"#;

#[tokio::test]
async fn refused_connection_is_a_502() {
    let gw = Gateway::start_upstream(&format!("http://{}", closed_port()), "").await;
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!((reply.status, reply.body.as_str()), (502, UNAVAILABLE));
    assert_eq!(
        reply.header("content-type"),
        Some("application/json; charset=utf-8")
    );
}

#[tokio::test]
async fn slow_hanging_and_endless_upstreams_are_a_504() {
    let gw = Gateway::start("").await;
    for failure in [Failure::Hang, Failure::EndlessBody] {
        gw.mock.set_failure(failure);
        let reply = gw.reset_as_ios("email=alice%40example.com").await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (504, UNAVAILABLE),
            "{failure:?}"
        );
    }
    gw.mock.set_failure(Failure::None);
    gw.mock.set_latency(Duration::from_secs(3));
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!((reply.status, reply.body.as_str()), (504, UNAVAILABLE));

    // Once QuickBlox is fast again, so is the gateway: the pool recovered.
    gw.mock.set_latency(Duration::ZERO);
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(reply.status, 200);
}

/// A server that takes the connection and never answers the TLS handshake: a connect
/// timeout (504 at `connect_timeout`), not a wait for the whole `upstream.timeout`.
#[tokio::test]
async fn a_stalled_tls_handshake_is_a_connect_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            kept.push(stream);
        }
    });
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = yaml(&format!("https://{addr}"), "", "").replace(
        "timeout: 400ms\n  connect_timeout: 400ms",
        "timeout: 30s\n  connect_timeout: 200ms",
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let started = std::time::Instant::now();
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!((reply.status, reply.body.as_str()), (504, UNAVAILABLE));
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "waited {waited:?}: upstream.timeout, not connect_timeout"
    );
    held.abort();
}

#[tokio::test]
async fn upstream_connections_are_kept_and_reused() {
    // One worker: each worker thread keeps connections of its own.
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(&yaml(&mock.url(), "", ""), "  workers: 1\n");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    for _ in 0..5 {
        let reply = gw.reset_as_ios("email=alice%40example.com").await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(gw.mock.requests().len(), 5);
    assert_eq!(
        gw.mock.connections(),
        1,
        "one keep-alive connection carried all five"
    );
}

/// An upstream that answers the first request of each connection and closes the
/// connection on reading the second, as one whose idle timeout raced with it: a `GET`
/// without a body goes again on a new connection, on a forwarded route as on the reset
/// path; a `POST` with a body does not (its bytes were read on the way).
#[tokio::test]
async fn a_bodiless_get_on_a_forwarded_route_goes_again_when_its_kept_connection_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let mut read = Vec::new();
                for answered in 0.. {
                    while !read.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read.extend_from_slice(&chunk[..n]),
                        }
                    }
                    if answered == 1 {
                        return; // closed under the second request
                    }
                    let end = read.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                    read.drain(..end + 4);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(
        &yaml(&format!("http://{addr}"), "  other_routes: forward\n", ""),
        "  workers: 1\n",
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    for i in 0..3 {
        let reply = gw.send("GET", "/users.json", &[], "").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ok"), "GET {i}");
    }
    // A POST with a body is not sent twice: the client gets the failure.
    assert_eq!(gw.send("GET", "/users.json", &[], "").await.status, 200);
    let post = gw
        .send("POST", "/users.json", &[("Content-Length", "2")], "{}")
        .await;
    assert_eq!(post.status, 502, "{post:?}");
    server.abort();
}

#[tokio::test]
async fn streamed_answers_give_their_connection_back_once_read() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(
        &yaml(&mock.url(), "  other_routes: forward\n", ""),
        "  workers: 1\n",
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    for _ in 0..3 {
        let reply = gw.send("GET", "/users.json?page=2", &[], "").await;
        assert_eq!(reply.status, 404); // qb-mock knows no /users.json
    }
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(reply.status, 200);
    assert_eq!(gw.mock.requests().len(), 4);
    assert_eq!(gw.mock.connections(), 1);
}

#[tokio::test]
async fn connections_quickblox_closed_while_idle_cost_no_request() {
    let gw = Gateway::start("").await;
    for round in 1..=3 {
        // QuickBlox (or a load balancer before it) drops the idle connection: the next
        // request goes on a new one, whether the gateway noticed the close already or
        // finds out when it tries the old connection.
        gw.mock.close_connections();
        let reply = gw.reset_as_ios("email=alice%40example.com").await;
        assert_eq!(reply.status, 200, "round {round}: {reply:?}");
    }
    assert_eq!(gw.mock.requests().len(), 3);
}

#[tokio::test]
async fn a_path_in_the_upstream_url_prefixes_every_upstream_path() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = yaml(&format!("{}/quickblox/", mock.url()), "", "");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    gw.reset_as_ios("email=alice%40example.com").await;
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/quickblox/users/password/reset.json");
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_eq!(seen[0].query.as_deref(), Some("email=alice@example.com"));
    let host = seen[0].headers["host"].to_str().unwrap().to_owned();
    assert_eq!(host, gw.mock.addr().to_string());
}

#[tokio::test]
async fn a_reset_mid_answer_is_a_502() {
    let gw = Gateway::start("").await;
    gw.mock.set_failure(Failure::AbortMidBody);
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!((reply.status, reply.body.as_str()), (502, UNAVAILABLE));
}

#[tokio::test]
async fn quickblox_errors_pass_through() {
    let gw = Gateway::start("").await;
    gw.mock.set_failure(Failure::Status(503));
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.body,
        r#"{"errors":["Service temporarily unavailable"]}"#
    );
}

#[tokio::test]
async fn https_upstream_with_a_private_ca() {
    let (mock, _dir, ca_file) = tls_mock(&[b"h2", b"http/1.1"]).await;
    let url = mock.url();
    assert!(url.starts_with("https://localhost:"));

    // Without the private CA the certificate is not trusted: 502.
    let untrusting = Gateway::start_upstream(&url, "").await;
    assert_eq!(
        untrusting
            .reset_as_ios("email=alice%40example.com")
            .await
            .status,
        502
    );

    let yaml = yaml(&url, "", "").replace(
        "  pass_headers:",
        &format!("  ca_file: {}\n  pass_headers:", ca_file.display()),
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["authorization"],
        format!("ApiKey {SERVER_KEY}")
    );
    assert_eq!(seen[0].version, http::Version::HTTP_2, "ALPN chose HTTP/2");

    // The TLS connection negotiated HTTP/2; when QuickBlox drops it, the next resets go on
    // a new one.
    for round in 1..=3 {
        gw.mock.close_connections();
        let reply = gw.reset_as_ios("email=alice%40example.com").await;
        assert_eq!(reply.status, 200, "round {round}: {reply:?}");
    }
}
