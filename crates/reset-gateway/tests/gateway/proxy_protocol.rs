//! Behind a TCP load balancer: a real HAProxy in TCP mode sends PROXY protocol v1
//! (`send-proxy`) or v2 (`send-proxy-v2`) headers, and the client they name is the one the
//! limits, QuickBlox's `X-Forwarded-For` and the access log see. Clients connect from
//! 127.0.0.2 and 127.0.0.3 (every 127/8 address reaches loopback); HAProxy connects to the
//! gateway from 127.0.0.1, the only trusted balancer, so an address the gateway sees other
//! than 127.0.0.1 can only have come from a header.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use qb_mock::MockServer;
use test_support::Haproxy;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::*;
use crate::process::spawn_gateway;

const V1: usize = 0;
const V2: usize = 1;

/// `server.proxy_protocol` trusting only 127.0.0.1, where HAProxy connects from.
fn proxy_keys(required: bool) -> String {
    format!("  proxy_protocol:\n    trusted: [127.0.0.1/32]\n    required: {required}\n")
}

/// A gateway with PROXY protocol on, `guard_extra` in its guard section.
async fn gateway(guard_extra: &str, required: bool) -> Gateway {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(&yaml(&mock.url(), guard_extra, ""), &proxy_keys(required));
    Gateway::start_yaml(mock, &yaml).await
}

/// HAProxy in TCP mode in front of `gateway`: listener `V1` sends v1 headers, `V2` v2.
fn balancer(gateway: SocketAddr) -> Haproxy {
    Haproxy::tcp(gateway, &["send-proxy", "send-proxy-v2"])
}

/// A connection to `addr` from the loopback address `source`.
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Writes `bytes` and reads until the other side closes.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Vec<u8> {
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("closed within 10 s")
        .unwrap_or_default();
    answer
}

fn reset_request(email: &str, extra: &str) -> String {
    format!(
        "GET {RESET}?email={email} HTTP/1.1\r\nHost: gateway.test\r\nQB-Token: {IOS_TOKEN}\r\n\
         {extra}Connection: close\r\n\r\n"
    )
}

/// A reset from `source` through `addr`.
async fn reset_from(source: [u8; 4], addr: SocketAddr, email: &str) -> u16 {
    let mut stream = connect_from(source, addr).await;
    parse(&exchange(&mut stream, reset_request(email, "").as_bytes()).await).status
}

async fn refused(gw: &Gateway, reason: &str) -> f64 {
    let metrics = gw.admin_get("/metrics").await.body;
    let series = format!("reset_gateway_proxy_protocol_refused_total{{reason=\"{reason}\"}}");
    sample(&metrics, &series).unwrap_or_else(|| panic!("{series} missing"))
}

/// The `X-Forwarded-For` of every request QuickBlox received.
fn forwarded_for(gw: &Gateway) -> Vec<String> {
    gw.mock
        .requests()
        .iter()
        .map(|r| r.headers["x-forwarded-for"].to_str().unwrap().to_owned())
        .collect()
}

const PER_IP_2: &str = "  limits:\n    per_ip: [{ requests: 2, per: 1h }]\n";

#[tokio::test]
async fn each_client_behind_haproxy_has_its_own_per_ip_quota_and_is_named_upstream() {
    for (listener, required) in [(V1, false), (V2, true)] {
        let gw = gateway(PER_IP_2, required).await;
        let haproxy = balancer(gw.addr);
        let addr = haproxy.addr(listener);
        let email = "alice%40example.com";
        // 127.0.0.2 spends its quota…
        for _ in 0..2 {
            assert_eq!(reset_from([127, 0, 0, 2], addr, email).await, 200);
        }
        assert_eq!(reset_from([127, 0, 0, 2], addr, email).await, 429);
        // …and 127.0.0.3, whose connections reach the gateway from the same balancer
        // address, still has its own.
        assert_eq!(reset_from([127, 0, 0, 3], addr, email).await, 200);
        assert_eq!(
            forwarded_for(&gw),
            ["127.0.0.2", "127.0.0.2", "127.0.0.3"],
            "listener {listener}"
        );
    }
}

#[tokio::test]
async fn a_kept_alive_connection_reads_its_header_once_and_every_request_is_the_clients() {
    let gw = gateway(PER_IP_2, true).await;
    let haproxy = balancer(gw.addr);
    let mut stream = connect_from([127, 0, 0, 2], haproxy.addr(V2)).await;
    let two = format!(
        "GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: gateway.test\r\nQB-Token: {IOS_TOKEN}\r\n\r\n{}",
        reset_request("alice%40example.com", "")
    );
    let answers = String::from_utf8(exchange(&mut stream, two.as_bytes()).await).unwrap();
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 2, "{answers}");
    assert_eq!(forwarded_for(&gw), ["127.0.0.2", "127.0.0.2"]);
    // Both were charged to 127.0.0.2.
    let email = "alice%40example.com";
    assert_eq!(
        reset_from([127, 0, 0, 2], haproxy.addr(V1), email).await,
        429
    );
}

#[tokio::test]
async fn the_x_forwarded_for_walk_starts_from_the_client_the_balancer_named() {
    // 127.0.0.2 is itself a proxy the guard trusts; 127.0.0.3 is not.
    let gw = gateway("  client_ip:\n    trusted_proxies: [127.0.0.2]\n", false).await;
    let haproxy = balancer(gw.addr);
    let claim = "X-Forwarded-For: 198.51.100.7\r\n";
    for source in [[127, 0, 0, 2], [127, 0, 0, 3]] {
        let mut stream = connect_from(source, haproxy.addr(V2)).await;
        let request = reset_request("alice%40example.com", claim);
        assert_eq!(
            parse(&exchange(&mut stream, request.as_bytes()).await).status,
            200
        );
    }
    assert_eq!(forwarded_for(&gw), ["198.51.100.7, 127.0.0.2", "127.0.0.3"]);
}

#[tokio::test]
async fn tls_on_the_gateway_behind_a_tcp_balancer() {
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;

    let dir = tempfile::tempdir().unwrap();
    let (ca_file, cert_file, key_file) = test_certificates(dir.path());
    let mock = MockServer::start(mock_config()).await.unwrap();
    let tls = format!(
        "  tls:\n    cert_file: {}\n    key_file: {}\n",
        cert_file.display(),
        key_file.display()
    );
    let keys = format!("{tls}{}", proxy_keys(true));
    let config = with_server_keys(&yaml(&mock.url(), "", ""), &keys);
    let gw = Gateway::start_yaml(mock, &config).await;
    let haproxy = balancer(gw.addr);

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_file_iter(&ca_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    for (listener, source) in [(V1, [127, 0, 0, 2]), (V2, [127, 0, 0, 3])] {
        let tcp = connect_from(source, haproxy.addr(listener)).await;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get(format!("{RESET}?email=alice%40example.com"))
            .header("qb-token", IOS_TOKEN)
            .header("host", "localhost")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    }
    assert_eq!(forwarded_for(&gw), ["127.0.0.2", "127.0.0.3"]);
}

/// A v2 header naming `source` (TCP over IPv4), `command` 0x21 (PROXY) or 0x20 (LOCAL).
fn v2_header(command: u8, source: [u8; 4]) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend([command, 0x11, 0, 12]);
    header.extend(source);
    header.extend([127, 0, 0, 1, 0xc3, 0x50, 0, 80]);
    header
}

#[tokio::test]
async fn a_header_from_a_peer_outside_trusted_is_refused_and_counted() {
    let gw = gateway("", false).await;
    let v1 = format!(
        "PROXY TCP4 198.51.100.7 127.0.0.1 50000 80\r\n{}",
        reset_request("alice%40example.com", "")
    );
    let mut v2 = v2_header(0x21, [198, 51, 100, 7]);
    v2.extend(reset_request("alice%40example.com", "").as_bytes());
    for header in [v1.as_bytes(), &v2] {
        let mut stream = connect_from([127, 0, 0, 3], gw.addr).await;
        let answer = exchange(&mut stream, header).await;
        assert!(
            answer.is_empty(),
            "closed without an answer, not {answer:?}"
        );
    }
    assert_eq!(refused(&gw, "untrusted").await, 2.0);
    assert!(gw.mock.requests().is_empty());
    // The same peer without a header is served as itself.
    assert_eq!(
        reset_from([127, 0, 0, 3], gw.addr, "alice%40example.com").await,
        200
    );
    assert_eq!(forwarded_for(&gw), ["127.0.0.3"]);
}

#[tokio::test]
async fn required_refuses_a_trusted_peer_without_a_header_and_local_keeps_the_peer() {
    let gw = gateway("", true).await;
    let mut stream = connect_from([127, 0, 0, 1], gw.addr).await;
    let answer = exchange(
        &mut stream,
        reset_request("alice%40example.com", "").as_bytes(),
    )
    .await;
    assert!(answer.is_empty(), "{answer:?}");
    assert_eq!(refused(&gw, "missing").await, 1.0);
    // A balancer's own health check (v2 LOCAL) is its own request.
    let mut local = v2_header(0x20, [198, 51, 100, 7]);
    local.extend(reset_request("alice%40example.com", "").as_bytes());
    let mut stream = connect_from([127, 0, 0, 1], gw.addr).await;
    assert_eq!(parse(&exchange(&mut stream, &local).await).status, 200);
    assert_eq!(forwarded_for(&gw), ["127.0.0.1"]);
    // Untrusted peers are not balancers: a header is not required of them.
    assert_eq!(
        reset_from([127, 0, 0, 3], gw.addr, "alice%40example.com").await,
        200
    );
}

#[tokio::test]
async fn broken_oversized_cut_short_and_stalled_headers_close_the_connection_by_reason() {
    let gw = gateway("", false).await;
    let mut oversized = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
    oversized.extend([0; 64]);
    let cases: [(&str, &[u8], bool); 4] = [
        (
            "malformed",
            b"PROXY TCP4 198.51.100.7 nonsense\r\nGET / HTTP/1.1\r\n\r\n",
            false,
        ),
        ("oversized", &oversized, false),
        ("truncated", b"PROXY TCP4 198.51.100.7 127.0.0.1", true),
        ("timeout", b"PROXY TCP4 198.51.100.7 127.0.0.1", false),
    ];
    for (reason, bytes, close_after) in cases {
        let mut stream = connect_from([127, 0, 0, 1], gw.addr).await;
        stream.write_all(bytes).await.unwrap();
        if close_after {
            stream.shutdown().await.unwrap();
        }
        // "timeout" sends nothing more: the gateway gives up at header_read_timeout.
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("closed within 10 s")
            .unwrap_or_default();
        assert!(answer.is_empty(), "{reason}: {answer:?}");
        assert_eq!(refused(&gw, reason).await, 1.0, "{reason}");
    }
    assert!(gw.mock.requests().is_empty());
}

#[tokio::test]
async fn the_admin_listener_never_takes_a_header() {
    let gw = gateway("", false).await;
    let mut stream = TcpStream::connect(gw.admin).await.unwrap();
    let request = "PROXY TCP4 127.0.0.1 127.0.0.1 50000 80\r\nGET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    let answer =
        String::from_utf8_lossy(&exchange(&mut stream, request.as_bytes()).await).into_owned();
    assert!(!answer.contains(" 200 "), "{answer}");
}

#[tokio::test]
async fn the_access_log_names_the_client_the_balancer_named() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let config = with_server_keys(&yaml(&mock.url(), "", ""), &proxy_keys(true));
    std::fs::write(&path, config).unwrap();
    let gw = spawn_gateway(&path);
    let haproxy = balancer(gw.addr);
    for listener in [V1, V2] {
        let status = reset_from(
            [127, 0, 0, 2],
            haproxy.addr(listener),
            "alice%40example.com",
        )
        .await;
        assert_eq!(status, 200);
    }
    let access = gw.access_lines_once(2).await;
    assert_eq!(access.len(), 2);
    for line in access {
        assert_eq!(line["client_ip"], "127.0.0.2", "{line}");
    }
    assert_eq!(
        mock.requests()
            .iter()
            .map(|r| r.headers["x-forwarded-for"]
                .to_str()
                .unwrap()
                .parse::<IpAddr>()
                .unwrap())
            .collect::<Vec<_>>(),
        vec![IpAddr::from([127, 0, 0, 2]); 2]
    );
}
