//! Hostile input: smuggling and header abuse, oversized targets, half-closed clients,
//! upstream rate limits, and answers that must not tell accounts apart.

use std::time::{Duration, Instant};

use qb_mock::{Failure, MockServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

const GOOD: &str = "GET /users/password/reset.json?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: ios-client-token-1a2b3c\r\n";

async fn status_of(gw: &Gateway, head: &str) -> u16 {
    raw(gw.addr, head.as_bytes()).await.status
}

#[tokio::test]
async fn smuggling_attempts_are_refused_and_never_reach_quickblox() {
    let gw = Gateway::start("").await;
    let cases = [
        ("Content-Length plus Transfer-Encoding", format!("{GOOD}Content-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n")),
        ("two different Content-Lengths", format!("{GOOD}Content-Length: 0\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")),
        ("Transfer-Encoding on a GET", format!("{GOOD}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n")),
        ("obs-fold continuation line", format!("{GOOD}X-Folded: a\r\n b\r\nConnection: close\r\n\r\n")),
        ("bare LF inside the query", "GET /users/password/reset.json?email=al\nice HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned()),
        ("CR inside the query", "GET /users/password/reset.json?email=al\rice HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned()),
        ("no Host on HTTP/1.1", "GET /users/password/reset.json?email=alice%40example.com HTTP/1.1\r\nQB-Token: ios-client-token-1a2b3c\r\nConnection: close\r\n\r\n".to_owned()),
        ("two Host headers", format!("{GOOD}Host: y\r\nConnection: close\r\n\r\n")),
        ("two Host headers, absolute-form", "GET http://x/users/password/reset.json?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nHost: y\r\nQB-Token: ios-client-token-1a2b3c\r\nConnection: close\r\n\r\n".to_owned()),
        ("a Host with a space", GOOD.replace("Host: x", "Host: a b") + "Connection: close\r\n\r\n"),
        ("a Host with a path", GOOD.replace("Host: x", "Host: a/b?c") + "Connection: close\r\n\r\n"),
    ];
    for (what, request) in cases {
        assert_eq!(status_of(&gw, &request).await, 400, "{what}");
    }
    assert!(gw.mock.requests().is_empty());
    // A target that names the host needs no Host (as nginx takes it); a port, an IPv6
    // literal and an empty Host are hosts.
    let absolute = "GET http://x/users/password/reset.json?email=alice%40example.com HTTP/1.1\r\nQB-Token: ios-client-token-1a2b3c\r\nConnection: close\r\n\r\n";
    assert_eq!(status_of(&gw, absolute).await, 200);
    for host in ["x:8080", "[2001:db8::1]:443", ""] {
        let request =
            GOOD.replace("Host: x", &format!("Host: {host}")) + "Connection: close\r\n\r\n";
        assert_eq!(status_of(&gw, &request).await, 200, "{host:?}");
    }
    // Identical duplicates of Content-Length: 0 carry no body and are harmless.
    let same = format!("{GOOD}Content-Length: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&gw, &same).await, 200);
}

/// On a forwarded route, Content-Length beside Transfer-Encoding is read by the latter and
/// the connection closed after the answer: what follows is never read as a request.
#[tokio::test]
async fn length_beside_chunked_on_a_forwarded_route_smuggles_nothing() {
    let gw = Gateway::start("  other_routes: forward\n").await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(
            b"POST /users.json HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n\
              0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answers = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answers))
        .await
        .expect("the gateway closed the connection")
        .unwrap();
    let answers = String::from_utf8_lossy(&answers);
    assert_eq!(answers.matches("HTTP/1.1 ").count(), 1, "{answers}");
    let paths: Vec<_> = gw.mock.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/users.json"]);
}

#[tokio::test]
async fn underscored_names_are_not_credentials_and_are_never_forwarded() {
    let gw = Gateway::start("  other_routes: forward\n").await;
    let head = "GET /users/password/reset.json?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB_Token: ios-client-token-1a2b3c\r\nConnection: close\r\n\r\n";
    assert_eq!(status_of(&gw, head).await, 401);
    let other = "GET /users.json HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\nX-Kept: 1\r\nConnection: close\r\n\r\n";
    raw(gw.addr, other.as_bytes()).await;
    let seen = &gw.mock.requests()[0].headers;
    assert!(seen.get("x_forwarded_for").is_none());
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-kept"], "1");
}

#[tokio::test]
async fn oversized_targets_get_414_and_heads_431() {
    let gw = Gateway::start("").await;
    let long = format!("GET /users/password/reset.json?email={}%40example.com HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "a".repeat(9000));
    let reply = raw(gw.addr, long.as_bytes()).await;
    assert_eq!(reply.status, 414);
    assert_eq!(
        reply.body,
        r#"{"errors":{"base":["Request target too long"]}}"#
    );
    assert!(reply.header("x-request-id").is_some());
    let huge = format!("GET /users/password/reset.json?email={}%40example.com HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "a".repeat(40_000));
    assert_eq!(raw(gw.addr, huge.as_bytes()).await.status, 431);
    assert!(gw.mock.requests().is_empty());
}

#[tokio::test]
async fn a_client_that_half_closes_still_gets_its_answer() {
    let mut config = mock_config();
    config.latency = Duration::from_millis(100);
    let gw = Gateway::start_with(config, "", "").await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(format!("{GOOD}\r\n").as_bytes())
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn forwarded_for_garbage_and_ipv6_from_a_trusted_proxy() {
    let gw = Gateway::start("  client_ip:\n    trusted_proxies: [127.0.0.0/8]\n  limits:\n    per_ip: [{ requests: 1, per: 1h }]\n    per_client: []\n    per_email: []\n    global: []\n").await;
    let with_xff = |xff: &str| format!("{GOOD}X-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n");
    // An IPv6 client behind the proxy is its own client; another in the same /64 is not a new one.
    assert_eq!(status_of(&gw, &with_xff("2001:db8::1")).await, 200);
    assert_eq!(status_of(&gw, &with_xff("2001:db8::2")).await, 429);
    // What a client scribbles left of the address its proxy appended is never read: no
    // way to dodge its own bucket, or to land in the proxy's.
    assert_eq!(
        status_of(&gw, &with_xff("garbage, 198.51.100.9")).await,
        200
    );
    assert_eq!(
        status_of(&gw, &with_xff("unknown, 198.51.100.9:4711")).await,
        429
    );
    // Nothing readable: the peer (the proxy itself) is the client.
    assert_eq!(status_of(&gw, &with_xff("999.1.1.1")).await, 200);
    assert_eq!(status_of(&gw, &with_xff("unknown")).await, 429);
}

#[tokio::test]
async fn quickblox_429_passes_through_with_retry_after() {
    let gw = Gateway::start("").await;
    gw.mock.set_failure(Failure::Status(429));
    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), Some("30"));
    // A 5xx storm: every answer is QuickBlox's, and the gateway keeps serving.
    gw.mock.set_failure(Failure::Status(500));
    for _ in 0..50 {
        assert_eq!(
            gw.reset_as_ios("email=alice%40example.com").await.status,
            500
        );
    }
    gw.mock.set_failure(Failure::None);
    assert_eq!(
        gw.reset_as_ios("email=alice%40example.com").await.status,
        200
    );
}

#[tokio::test]
async fn existing_unknown_and_limited_addresses_look_the_same_and_take_the_floor() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = yaml(
        &mock.url(),
        "  responses: { uniform: true, min_latency: 300ms }\n  limits:\n    per_ip: []\n    per_client: []\n    per_email: [{ requests: 1, per: 1h }]\n    global: []\n",
        "",
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let mut answers = Vec::new();
    for email in [
        "alice%40example.com",
        "nobody%40example.com",
        "alice%40example.com",
    ] {
        let started = Instant::now();
        let reply = gw.reset_as_ios(&format!("email={email}")).await;
        // A floor, not a speed: every answer takes at least min_latency.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{email} answered early"
        );
        answers.push((reply.status, reply.stable_headers(), reply.body));
    }
    assert_eq!(answers[0], answers[1], "existing vs unknown");
    assert_eq!(answers[0], answers[2], "existing vs per-email denial");
    assert_eq!(
        gw.mock.requests().len(),
        2,
        "the limited one never reached QuickBlox"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_do_not_starve_the_ones_being_served() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(
        &yaml(&mock.url(), "", ""),
        "  max_connections: 4\n  workers: 1\n",
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    // A keep-alive client already being served…
    let mut client = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let one = format!("{GOOD}\r\n");
    let mut buf = vec![0u8; 4096];
    client.write_all(one.as_bytes()).await.unwrap();
    let n = client.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // …then a crowd of connections that never send anything.
    let mut crowd = Vec::new();
    for _ in 0..1000 {
        crowd.push(tokio::net::TcpStream::connect(gw.addr).await.unwrap());
    }
    // The client keeps being answered, promptly, throughout.
    for _ in 0..20 {
        client.write_all(one.as_bytes()).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    drop(crowd);
    // And the gateway is still whole for newcomers.
    assert_eq!(
        gw.reset_as_ios("email=alice%40example.com").await.status,
        200
    );
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// An upstream that answers every request with 1 MiB.
async fn megabyte_answers() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_| async {
                let body = http_body_util::Full::new(bytes::Bytes::from(vec![b'x'; 1 << 20]));
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// An HTTP/2 frame: its type, flags, stream and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// A client that grants the largest flow-control window, asks for 32 big answers on a
/// forwarded route and then reads nothing: what the gateway holds for it is bounded by
/// the streams' send buffers and the upstream connections' read-ahead (16 KiB each), not
/// by the answers (with hyper's 400 KiB for both it held about 40 MB a connection).
#[tokio::test]
async fn an_http2_client_that_grants_a_huge_window_and_reads_nothing_does_not_pin_memory() {
    let upstream = megabyte_answers().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let config = yaml(
        &format!("http://{upstream}"),
        "  other_routes: forward\n",
        "",
    );
    std::fs::write(&path, with_server_keys(&config, "  workers: 1\n")).unwrap();
    let gw = crate::process::spawn_gateway(&path);
    let before = rss_kib(gw.child.id());
    // HPACK literals, not indexed: a GET of /big.
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "gateway.test"),
        (":path", "/big"),
    ] {
        block.push(0);
        block.push(name.len() as u8);
        block.extend(name.as_bytes());
        block.push(value.len() as u8);
        block.extend(value.as_bytes());
    }
    let mut clients = Vec::new();
    for _ in 0..2 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut client = socket.connect(gw.addr).await.unwrap();
        let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let largest: u32 = (1 << 31) - 1;
        let mut window = vec![0, 4];
        window.extend(largest.to_be_bytes());
        opening.extend(h2_frame(4, 0, 0, &window));
        opening.extend(h2_frame(8, 0, 0, &(largest - 65_535).to_be_bytes()));
        for stream in 0..32u32 {
            opening.extend(h2_frame(1, 0x5, 1 + 2 * stream, &block));
        }
        client.write_all(&opening).await.unwrap();
        clients.push(client);
    }
    // The most it holds while the answers pile up (they stop once the buffers are full).
    let mut most = before;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        most = most.max(rss_kib(gw.child.id()));
    }
    drop(clients);
    // A bound, not a speed: far less than the 64 MiB of answers asked for.
    assert!(
        most.saturating_sub(before) < 32 * 1024,
        "RSS grew from {before} KiB to {most} KiB"
    );
}

#[tokio::test]
async fn a_client_that_never_reads_its_answers_does_not_pin_memory() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml(&mock.url(), "", "")).unwrap();
    let gw = crate::process::spawn_gateway(&path);
    let before = rss_kib(gw.child.id());
    // Up to a million pipelined requests (~100 MB), and not one byte of the answers read.
    // The kernel's socket buffers on both sides absorb some megabytes first.
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let request = "GET /users/password/reset.json?email=nope HTTP/1.1\r\nHost: x\r\nQB-Token: ios-client-token-1a2b3c\r\n\r\n";
    let burst = request.repeat(1000);
    let mut sent = 0;
    for _ in 0..1000 {
        // The gateway stops reading once its answers back up: writes then block.
        match tokio::time::timeout(
            Duration::from_millis(500),
            stream.write_all(burst.as_bytes()),
        )
        .await
        {
            Ok(Ok(())) => sent += 1000,
            _ => break,
        }
    }
    let after = rss_kib(gw.child.id());
    // Once the socket buffers are full the gateway stops reading, and the writes block.
    assert!(
        sent < 1_000_000,
        "the gateway kept reading requests whose answers nobody took"
    );
    // A bound, not a speed: far less than the requests would need if their answers piled up.
    assert!(
        after.saturating_sub(before) < 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // Others are still served meanwhile.
    let reply = raw(
        gw.addr,
        format!("{GOOD}Connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200);
}

/// nginx's send_timeout: a client that takes nothing of its answers is let go, or a few
/// thousand such connections would hold every max_connections slot for ever.
#[tokio::test]
async fn a_client_that_never_reads_is_dropped_after_the_request_timeout() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(&yaml(&mock.url(), "", ""), "  request_timeout: 1s\n");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(gw.addr).await.unwrap();
    // Answers the gateway makes itself (404), pipelined until its writes back up.
    let burst = "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
    let mut sent = 0;
    while let Ok(Ok(())) = tokio::time::timeout(
        Duration::from_millis(500),
        stream.write_all(burst.as_bytes()),
    )
    .await
    {
        sent += 1000;
    }
    // Not a byte read for twice the timeout, then everything the gateway wrote before it
    // gave up: fewer answers than requests (it used to wait, then answer every one).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut answers = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = vec![0; 65536];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answers.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "still open after {} bytes", answers.len());
    assert!(answers.starts_with(b"HTTP/1.1 404"));
    let answered = answers.windows(12).filter(|w| w == b"HTTP/1.1 404").count();
    assert!(
        answered < sent,
        "{answered} answers to {sent} requests: never dropped"
    );
}

/// An HTTP/2 connection that asks nothing more is closed (GOAWAY) at the header read
/// timeout, as an idle HTTP/1.1 one is; a request longer than that is not cut short.
#[tokio::test]
async fn idle_http2_connections_are_closed_but_slow_requests_finish() {
    let mut config = mock_config();
    config.latency = Duration::from_millis(800);
    let mock = MockServer::start(config).await.unwrap();
    let yaml = yaml(&mock.url(), "", "").replace("timeout: 400ms", "timeout: 5s");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let (mut sender, connection) = h2_client(&gw, 65535).await;
    let mut request = h2_get(&gw, &format!("{RESET}?email=alice%40example.com"));
    request
        .headers_mut()
        .insert("qb-token", http::HeaderValue::from_static(IOS_TOKEN));
    // 800ms at QuickBlox, past the 300ms header read timeout.
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    // hyper's client answers the gateway's pings: only the gateway can end this.
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the idle connection was closed")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn slowloris_dribbling_a_head_byte_by_byte_is_cut_off() {
    let gw = Gateway::start("").await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = GOOD.as_bytes();
    let started = Instant::now();
    let mut cut_off = false;
    // One byte every 50ms: the whole head would take seconds; the limit is 300ms in total.
    for byte in head.iter().cycle().take(200) {
        if stream.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(1), stream.peek(&mut probe)).await
        {
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "the dribbling connection was kept open");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(gw.mock.requests().is_empty());
}

/// A client silent until just before the header read timeout (1s here), then dribbling
/// its head, is cut off at that deadline: the time before HTTP counts (hyper's own timer
/// starts when it begins reading, which alone would give it about twice as long).
#[tokio::test]
async fn a_head_begun_late_must_still_end_by_the_header_read_timeout() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let yaml =
        yaml(&mock.url(), "", "").replace("header_read_timeout: 300ms", "header_read_timeout: 1s");
    let gw = Gateway::start_yaml(mock, &yaml).await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(900)).await;
    // The first byte tells HTTP/1.1 from HTTP/2; then one byte every 50ms, for up to
    // three seconds.
    for byte in GOOD.as_bytes().iter().cycle().take(60) {
        if stream.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(1), stream.peek(&mut probe)).await
        {
            break;
        }
    }
    // Cut at 1s, seen within 50ms; a second timeout counted from the head's start
    // would cut at about 1.9s.
    let cut_after = started.elapsed();
    assert!(
        cut_after < Duration::from_millis(1500),
        "cut after {cut_after:?}, the limit 1s after the connection opened"
    );
    assert!(gw.mock.requests().is_empty());
}

#[tokio::test]
async fn a_hanging_quickblox_does_not_hold_up_other_clients() {
    let gw = Gateway::start("").await;
    gw.mock.set_failure(Failure::Hang);
    let hanging: Vec<_> = (0..20)
        .map(|_| {
            let addr = gw.addr;
            tokio::spawn(async move {
                raw(addr, format!("{GOOD}Connection: close\r\n\r\n").as_bytes())
                    .await
                    .status
            })
        })
        .collect();
    // Meanwhile, requests the guard answers itself are answered at once.
    for _ in 0..20 {
        assert_eq!(
            gw.reset("email=bad", &[("QB-Token", IOS_TOKEN)])
                .await
                .status,
            422
        );
    }
    for task in hanging {
        assert_eq!(task.await.unwrap(), 504);
    }
    gw.mock.set_failure(Failure::None);
    assert_eq!(
        gw.reset_as_ios("email=alice%40example.com").await.status,
        200
    );
}

/// An upstream for forwarded routes: `/slow` streams ten chunks 200ms apart, `/big`
/// answers 64 MiB, anything else a short 200.
async fn streaming_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = vec![0u8; 8192];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET /slow") {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        .await;
                    for _ in 0..10 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if stream.write_all(b"5\r\nhello\r\n").await.is_err() {
                            return;
                        }
                    }
                    let _ = stream.write_all(b"0\r\n\r\n").await;
                } else if head.starts_with(b"GET /big") {
                    let len = 64usize << 20;
                    let _ = stream
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").as_bytes(),
                        )
                        .await;
                    let chunk = vec![b'x'; 1 << 16];
                    for _ in 0..len / chunk.len() {
                        if stream.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
                // Keep-alive: the gateway's pool may send the next request here.
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    addr
}

async fn forwarding_gateway(server_keys: &str) -> Gateway {
    let upstream = format!("http://{}", streaming_upstream().await);
    let yaml = yaml(&upstream, "  other_routes: forward\n", "")
        .replace("timeout: 400ms\n  connect", "timeout: 10s\n  connect");
    let mock = MockServer::start(mock_config()).await.unwrap();
    Gateway::start_yaml(mock, &with_server_keys(&yaml, server_keys)).await
}

async fn h2_client(
    gw: &Gateway,
    window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    h2_client_windows(gw, window, window).await
}

/// An HTTP/2 client with a window for each stream and one for the whole connection.
async fn h2_client_windows(
    gw: &Gateway,
    window: u32,
    connection_window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(window)
        .initial_connection_window_size(connection_window)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    (sender, tokio::spawn(connection))
}

fn h2_get(gw: &Gateway, path: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(format!("http://{}{path}", gw.addr))
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// A request whose answer is still streaming is open: its connection is not idle, however
/// long past the header read timeout (300ms) the stream runs.
#[tokio::test]
async fn an_http2_answer_still_streaming_keeps_its_connection_open() {
    use http_body_util::BodyExt;
    let gw = forwarding_gateway("").await;
    let (mut sender, _connection) = h2_client(&gw, 65535).await;
    let response = sender.send_request(h2_get(&gw, "/slow")).await.unwrap();
    let body = tokio::spawn(async move { response.into_body().collect().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let second = sender.send_request(h2_get(&gw, "/other")).await;
    assert_eq!(
        second.unwrap().status(),
        200,
        "no GOAWAY while a body streams"
    );
    assert_eq!(body.await.unwrap().to_bytes().len(), 50);
}

/// Over HTTP/2 a client that stops reading closes its flow-control window, not the socket:
/// the answer waiting on it for server.request_timeout drops the connection.
#[tokio::test]
async fn an_http2_client_that_stops_reading_an_answer_is_dropped() {
    let gw = forwarding_gateway("  request_timeout: 1s\n").await;
    let (mut sender, connection) = h2_client(&gw, 65535).await;
    let response = sender.send_request(h2_get(&gw, "/big")).await.unwrap();
    assert_eq!(response.status(), 200);
    // The body is never read.
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(ended.is_ok(), "the paused download held its connection");
    drop(response);
}

/// A client's HTTP/2 connection preface and an empty SETTINGS frame.
const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// An HTTP/2 client that opens a connection and then answers nothing, not even the ping
/// that goes with the GOAWAY, is dropped a header read timeout (300ms) after it, not when
/// hyper's own keep-alive gives up (40 s).
#[tokio::test]
async fn a_silent_http2_connection_is_dropped_soon_after_its_goaway() {
    let gw = Gateway::start("").await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // Nothing after, no acknowledgement ever.
    stream.write_all(H2_PREFACE_AND_SETTINGS).await.unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "still open after 10s");
}

/// Each open stream of a forwarded route can hold an upstream exchange: one connection
/// may have 32 open at once (hyper's default is 200).
#[tokio::test]
async fn an_http2_connection_may_open_32_streams_at_once() {
    let gw = Gateway::start("").await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(H2_PREFACE_AND_SETTINGS).await.unwrap();
    // The server's first frame is its SETTINGS: six bytes per setting, id then value.
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(head[3], 4, "a SETTINGS frame");
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    let max_streams = payload
        .chunks(6)
        .find(|s| u16::from_be_bytes([s[0], s[1]]) == 3)
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    assert_eq!(max_streams, Some(32));
}

/// Slow but steady readers are not stalled ones: two downloads on one connection, each
/// read a frame every 20ms, go on past three times server.request_timeout (1s).
#[tokio::test]
async fn slow_http2_readers_of_two_streams_are_not_dropped() {
    use http_body_util::BodyExt;
    let gw = forwarding_gateway("  request_timeout: 1s\n").await;
    let (mut sender, connection) = h2_client(&gw, 65535).await;
    let mut readers = Vec::new();
    for _ in 0..2 {
        let response = sender.send_request(h2_get(&gw, "/big")).await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut body = response.into_body();
            let (mut read, started) = (0usize, Instant::now());
            while started.elapsed() < Duration::from_secs(3) {
                let frame = body
                    .frame()
                    .await
                    .expect("the body goes on")
                    .expect("no error");
                read += frame.data_ref().map_or(0, |d| d.len());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            read
        }));
    }
    for reader in readers {
        assert!(reader.await.unwrap() > 0);
    }
    assert!(!connection.is_finished(), "the connection was dropped");
}

/// One stream read slowly does not keep another the client never reads (and the upstream
/// exchange behind it) alive: each answer waits on its own clock.
#[tokio::test]
async fn a_stream_never_read_drops_its_connection_however_another_is_read() {
    use http_body_util::BodyExt;
    let gw = forwarding_gateway("  request_timeout: 1s\n").await;
    let (mut sender, connection) = h2_client_windows(&gw, 65535, 4 << 20).await;
    let _parked = sender.send_request(h2_get(&gw, "/big")).await.unwrap();
    let read = sender.send_request(h2_get(&gw, "/big")).await.unwrap();
    tokio::spawn(async move {
        let mut body = read.into_body();
        while let Some(Ok(_)) = body.frame().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(ended.is_ok(), "the parked stream kept its connection");
}

/// A connection to `to` from the loopback address `from` (127.0.0.0/8 is all local).
async fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind((std::net::Ipv4Addr::from(from), 0).into())
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Asks `/healthz` over `stream` and reads the status line; the connection stays open.
async fn healthz_kept_open(stream: &mut tokio::net::TcpStream) -> std::io::Result<[u8; 12]> {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await?;
    let mut answer = [0u8; 12];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}

/// Connections held open on the admin listener are bounded: beyond
/// `admin::MAX_CONNECTIONS` a connection waits in the backlog (it cannot take the file
/// descriptors the public listener needs), and is served once one of them closes; one
/// address may hold `admin::MAX_CONNECTIONS_PER_PEER` (more are closed at once), so one
/// client cannot keep the orchestrator's probes waiting.
#[tokio::test]
async fn admin_connections_are_bounded_in_all_and_per_address() {
    use reset_gateway::admin::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER};
    let gw = Gateway::start("").await;
    // One address: its places, then one more, closed at once, while another's probe is
    // served.
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_PEER {
        let mut stream = connect_from([127, 0, 0, 2], gw.admin).await;
        assert_eq!(
            &healthz_kept_open(&mut stream).await.unwrap(),
            b"HTTP/1.1 200"
        );
        held.push(stream);
    }
    let mut one_more = connect_from([127, 0, 0, 2], gw.admin).await;
    let refused = tokio::time::timeout(Duration::from_secs(10), healthz_kept_open(&mut one_more));
    assert!(
        refused.await.unwrap().is_err(),
        "a place beyond the address's own"
    );
    let mut probe = connect_from([127, 0, 0, 3], gw.admin).await;
    assert_eq!(
        &healthz_kept_open(&mut probe).await.unwrap(),
        b"HTTP/1.1 200"
    );
    drop(probe);

    // Every place taken, from enough addresses.
    let mut address = 4;
    while held.len() < MAX_CONNECTIONS {
        for _ in 0..MAX_CONNECTIONS_PER_PEER.min(MAX_CONNECTIONS - held.len()) {
            let mut stream = connect_from([127, 0, 0, address], gw.admin).await;
            assert_eq!(
                &healthz_kept_open(&mut stream).await.unwrap(),
                b"HTTP/1.1 200"
            );
            held.push(stream);
        }
        address += 1;
    }
    let waiting = tokio::spawn(gw_admin_healthz(gw.admin));
    // Not answered while every place is taken (the held ones' next head may take up to
    // 5 s to time out), while the public listener serves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "served beyond the bound");
    assert_eq!(status_of(&gw, &format!("{GOOD}\r\n")).await, 200);
    held.pop();
    let answered = tokio::time::timeout(Duration::from_secs(20), waiting).await;
    assert_eq!(
        answered.expect("served once a place was free").unwrap(),
        200
    );
}

async fn gw_admin_healthz(admin: std::net::SocketAddr) -> u16 {
    raw(
        admin,
        b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await
    .status
}

/// An admin client that sends requests and never reads the answers is not held by the
/// head's read timeout (the gateway is writing): its connection ends after
/// `admin::CONNECTION_LIFETIME` (on the test's paused clock).
#[tokio::test(start_paused = true)]
async fn an_admin_client_that_never_reads_is_dropped() {
    let gw = Gateway::start("").await;
    let mut stream = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    let started = tokio::time::Instant::now();
    let request = b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n".repeat(64);
    // The gateway's answers fill both sockets' buffers, it stops reading, the writes
    // wait: until the gateway closes the connection.
    let lifetime = reset_gateway::admin::CONNECTION_LIFETIME;
    let writing = async { while stream.write_all(&request).await.is_ok() {} };
    let closed = tokio::time::timeout(lifetime * 3, writing).await;
    assert!(closed.is_ok(), "still open after three lifetimes");
    assert!(started.elapsed() >= reset_gateway::admin::CONNECTION_LIFETIME);
}

/// An HTTP/2-only QuickBlox over TLS (ALPN `h2`) trusting nothing but `dir`'s test CA:
/// `/big` answers 8 MiB, every other path `{}`. Returns its address, the CA file and how
/// many bytes of the big answers it has handed to its connections.
async fn h2_upstream_with_big_answers(
    dir: &std::path::Path,
) -> (
    std::net::SocketAddr,
    std::path::PathBuf,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::AtomicUsize;
    let (tls, ca_file) = tls_server_config(dir, &[b"h2"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = sent.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, sent) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: http::Request<_>| {
                    let sent = sent.clone();
                    async move {
                        use http_body_util::BodyExt;
                        let body = if request.uri().path() == "/big" {
                            CountedBody { chunks: 512, sent }.boxed()
                        } else {
                            http_body_util::Full::new(bytes::Bytes::from_static(b"{}"))
                                .map_err(|never| match never {})
                                .boxed()
                        };
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    (addr, ca_file, sent)
}

/// An answer of `chunks` parts of 16 KiB, each counted in `sent` as the connection takes it.
struct CountedBody {
    chunks: usize,
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        const CHUNK: usize = 16 * 1024;
        if self.chunks == 0 {
            return std::task::Poll::Ready(None);
        }
        self.chunks -= 1;
        self.sent
            .fetch_add(CHUNK, std::sync::atomic::Ordering::Relaxed);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from(
            vec![b'x'; CHUNK],
        )))))
    }
}

/// Clients that ask for big answers on a forwarded route and read nothing share the one
/// HTTP/2 connection to QuickBlox with every reset. What each stream may read ahead is
/// bounded (64 KiB) well below the connection's window (16 MiB), so the resets' answers
/// still flow; with hyper's defaults (2 MiB a stream, 5 MiB the connection) these six
/// clients used the connection's window up and every reset waited out `upstream.timeout`
/// (504).
#[tokio::test]
async fn clients_reading_nothing_do_not_hold_up_resets_on_a_shared_http2_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, ca_file, sent) = h2_upstream_with_big_answers(dir.path()).await;
    let config = yaml(
        &format!("https://localhost:{}", upstream.port()),
        "  other_routes: forward\n",
        "",
    )
    .replace("  timeout: 400ms\n", "  timeout: 3s\n")
    .replace("  connect_timeout: 400ms\n", "  connect_timeout: 3s\n")
    .replace(
        "  pass_headers:",
        &format!("  ca_file: {}\n  pass_headers:", ca_file.display()),
    );
    let gw = Gateway::start_yaml(
        MockServer::start(mock_config()).await.unwrap(),
        &with_server_keys(&config, "  workers: 1\n  request_timeout: 60s\n"),
    )
    .await;
    // The first reset makes the one HTTP/2 connection every request then shares.
    assert_eq!(
        gw.reset_as_ios("email=alice%40example.com").await.status,
        200
    );

    let mut readers_of_nothing = Vec::new();
    for _ in 0..6 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut client = socket.connect(gw.addr).await.unwrap();
        client
            .write_all(b"GET /big HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
            .await
            .unwrap();
        readers_of_nothing.push(client);
    }
    // Until QuickBlox has sent all it can: what the windows and buffers let through.
    let mut last = usize::MAX;
    poll_until(
        500,
        async || {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = sent.load(std::sync::atomic::Ordering::Relaxed);
            std::mem::replace(&mut last, now) == now && now > 0
        },
        |settled| *settled,
    )
    .await;

    for email in ["alice%40example.com", "nobody%40example.com"] {
        let reply = gw.reset_as_ios(&format!("email={email}")).await;
        assert_eq!(reply.status, 200, "{email}: {}", reply.body);
    }
    drop(readers_of_nothing);
}
