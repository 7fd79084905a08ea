//! The proxy boundary against a hostile or broken QuickBlox and hostile clients: the
//! framing of every answer is the gateway's own, a non-final status from QuickBlox is a
//! bad gateway, a client's broken body is the client's error, and a cut-short HTTP/2
//! preface costs nothing while it waits.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use qb_mock::MockServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

const UNAVAILABLE: &str = r#"{"errors":{"base":["Upstream unavailable"]}}"#;
const NO_CREDENTIALS: &str =
    r#"{"errors":{"base":["QB-Token or Authorization header is required"]}}"#;
const BAD_BODY: &str = r#"{"errors":{"base":["Request body is malformed or cut short"]}}"#;
/// What a hostile upstream tries to slip in as the answer to the client's next request.
const INJECTED: &str = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected";

/// An upstream that answers every request head with the same bytes, then closes (or
/// keeps the connection open, sending nothing more).
struct RawUpstream {
    addr: SocketAddr,
}

impl RawUpstream {
    async fn start(answer: String) -> RawUpstream {
        Self::start_with(answer, true).await
    }

    async fn start_with(answer: String, close: bool) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let _ = stream.write_all(answer.as_bytes()).await;
                    if close {
                        let _ = stream.shutdown().await;
                    } else {
                        // Held open until the gateway closes it.
                        let _ = stream.read(&mut byte).await;
                    }
                });
            }
        });
        RawUpstream { addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A gateway in front of `upstream`, with `guard_extra` added to its guard section.
async fn gateway_before(upstream: &str, guard_extra: &str) -> Gateway {
    let mock = MockServer::start(mock_config()).await.unwrap();
    Gateway::start_yaml(mock, &yaml(upstream, guard_extra, "")).await
}

/// The routes an upstream answer reaches the client by: (what, guard settings, target,
/// status QuickBlox answers with).
const ROUTES: [(&str, &str, &str, u16); 3] = [
    (
        "reset, uniform off",
        "  responses:\n    uniform: false\n",
        "/users/password/reset.json?email=alice%40example.com",
        200,
    ),
    (
        "reset, uniform on, a status it keeps",
        "",
        "/users/password/reset.json?email=alice%40example.com",
        500,
    ),
    (
        "forwarded route",
        "  other_routes: forward\n",
        "/users.json?page=2",
        200,
    ),
];

/// Sends the request for `target` and, pipelined on the same connection, a reset without
/// credentials that the gateway answers itself; returns every answer read off the wire and
/// whether the bytes ended inside an answer.
async fn pipelined(gw: &Gateway, target: &str) -> (Vec<Reply>, bool) {
    let requests = format!(
        "GET {target} HTTP/1.1\r\nHost: gateway.test\r\nQB-Token: {IOS_TOKEN}\r\n\r\n\
         GET {RESET}?email=bob%40example.com HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n"
    );
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(requests.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the gateway answered and closed within 10s")
        .unwrap();
    read_answers(&bytes)
}

/// Splits HTTP/1.1 answers as a client does: by their `Transfer-Encoding` or
/// `Content-Length`, else to the end. The flag is set if the bytes ended inside an answer.
fn read_answers(mut bytes: &[u8]) -> (Vec<Reply>, bool) {
    let mut answers = Vec::new();
    while !bytes.is_empty() {
        let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
            return (answers, true);
        };
        let head = parse(&bytes[..end + 4]);
        let mut rest = &bytes[end + 4..];
        let body = if head.header("transfer-encoding") == Some("chunked") {
            let mut body = Vec::new();
            loop {
                let Some(line) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return (answers, true);
                };
                let size = std::str::from_utf8(&rest[..line]).unwrap();
                let size = usize::from_str_radix(size, 16).unwrap();
                rest = &rest[line + 2..];
                if rest.len() < size + 2 {
                    return (answers, true);
                }
                body.extend_from_slice(&rest[..size]);
                rest = &rest[size + 2..];
                if size == 0 {
                    break;
                }
            }
            body
        } else if let Some(length) = head.header("content-length") {
            let length: usize = length.parse().unwrap();
            if rest.len() < length {
                return (answers, true);
            }
            let body = rest[..length].to_vec();
            rest = &rest[length..];
            body
        } else {
            std::mem::take(&mut rest).to_vec()
        };
        answers.push(Reply {
            body: String::from_utf8_lossy(&body).into_owned(),
            ..head
        });
        bytes = rest;
    }
    (answers, false)
}

/// `body` as one chunk, then the last chunk.
fn chunked(body: &str) -> String {
    format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len())
}

#[tokio::test]
async fn upstream_framing_headers_never_reach_the_client() {
    let hidden = format!("hello{INJECTED}");
    for (route, guard_extra, target, status) in ROUTES {
        let line = format!("HTTP/1.1 {status} Whatever\r\n");
        // (what QuickBlox sends, the body the client must get)
        let cases = [
            (
                "Content-Length beside Transfer-Encoding",
                format!(
                    "{line}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                    chunked(&hidden)
                ),
                hidden.as_str(),
            ),
            (
                "Content-Length shorter than the body",
                format!("{line}Content-Length: 5\r\n\r\n{hidden}"),
                "hello",
            ),
        ];
        for (what, answer, body) in cases {
            let upstream = RawUpstream::start(answer).await;
            let gw = gateway_before(&upstream.url(), guard_extra).await;
            let (answers, cut) = pipelined(&gw, target).await;
            assert!(!cut, "{route}, {what}: {answers:?}");
            assert_eq!(answers.len(), 2, "{route}, {what}: {answers:?}");
            assert_eq!(
                (answers[0].status, answers[0].body.as_str()),
                (status, body),
                "{route}, {what}"
            );
            assert_eq!(
                (answers[1].status, answers[1].body.as_str()),
                (401, NO_CREDENTIALS),
                "{route}, {what}: the next request got its own answer"
            );
        }
    }
}

#[tokio::test]
async fn upstream_bodies_that_break_their_framing_never_desync_the_client() {
    for (route, guard_extra, target, status) in ROUTES {
        let line = format!("HTTP/1.1 {status} Whatever\r\n");
        let cases = [
            (
                "Content-Length longer than the body",
                format!("{line}Content-Length: 100\r\n\r\nhello"),
            ),
            (
                "two different Content-Lengths",
                format!("{line}Content-Length: 5\r\nContent-Length: 50\r\n\r\nhello{INJECTED}"),
            ),
        ];
        for (what, answer) in cases {
            let upstream = RawUpstream::start(answer).await;
            let gw = gateway_before(&upstream.url(), guard_extra).await;
            let (answers, cut) = pipelined(&gw, target).await;
            for answer in &answers {
                assert!(!answer.body.contains("injected"), "{route}, {what}");
            }
            if route == "forwarded route" && what.starts_with("Content-Length longer") {
                // The head was streamed before the body broke: the client sees its answer cut
                // short and the connection closed, never a second answer.
                assert!(cut, "{route}, {what}: {answers:?}");
                assert!(answers.is_empty(), "{route}, {what}: {answers:?}");
                continue;
            }
            assert!(!cut, "{route}, {what}: {answers:?}");
            assert_eq!(answers.len(), 2, "{route}, {what}: {answers:?}");
            assert_eq!(
                (answers[0].status, answers[0].body.as_str()),
                (502, UNAVAILABLE),
                "{route}, {what}"
            );
            assert_eq!(answers[1].status, 401, "{route}, {what}");
        }
    }
}

/// One HTTP/2 request to the gateway over cleartext.
async fn h2_get(addr: SocketAddr, target: &str) -> (u16, Option<String>, Bytes) {
    let mut sender = h2_connect(addr).await;
    let request = http::Request::get(format!("http://{addr}{target}"))
        .header("qb-token", IOS_TOKEN)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let length = response
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, length, body)
}

#[tokio::test]
async fn http2_clients_get_the_gateways_framing_too() {
    let hidden = format!("hello{INJECTED}");
    let answer = format!(
        "HTTP/1.1 500 Whatever\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        chunked(&hidden)
    );
    let upstream = RawUpstream::start(answer).await;
    for (route, guard_extra, target, _) in ROUTES {
        let gw = gateway_before(&upstream.url(), guard_extra).await;
        let (status, length, body) = h2_get(gw.addr, target).await;
        assert_eq!((status, &body[..]), (500, hidden.as_bytes()), "{route}");
        if let Some(length) = length {
            assert_eq!(length, hidden.len().to_string(), "{route}");
        }
    }
}

#[tokio::test]
async fn a_status_that_is_not_final_is_a_bad_gateway() {
    let answers = [
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "HTTP/1.1 600 Beyond\r\nContent-Length: 0\r\n\r\n",
    ];
    for answer in answers {
        let upstream = RawUpstream::start(answer.to_owned()).await;
        let mut bad_gateways = 0;
        for (route, guard_extra, target, _) in ROUTES {
            let gw = gateway_before(&upstream.url(), guard_extra).await;
            let (answers, cut) = pipelined(&gw, target).await;
            assert!(!cut, "{route}, {answer:?}: {answers:?}");
            assert_eq!(answers.len(), 2, "{route}, {answer:?}: {answers:?}");
            assert_eq!(
                (answers[0].status, answers[0].body.as_str()),
                (502, UNAVAILABLE),
                "{route}, {answer:?}"
            );
            assert_eq!(answers[1].status, 401, "{route}, {answer:?}");
            let (status, _, body) = h2_get(gw.addr, target).await;
            assert_eq!(
                (status, &body[..]),
                (502, UNAVAILABLE.as_bytes()),
                "{route}"
            );
            bad_gateways += 2;
            let metrics = gw.admin_get("/metrics").await.body;
            assert_eq!(
                sample(
                    &metrics,
                    r#"reset_gateway_requests_total{outcome="upstream_unavailable"}"#
                ),
                Some(2.0),
                "{route}, {answer:?}: counted as an upstream error"
            );
        }
        assert_eq!(bad_gateways, 6);
    }
}

/// An upstream that reads each request's whole body before it answers, as an API does.
async fn body_reading_upstream() -> SocketAddr {
    counting_body_reader().await.0
}

/// [`body_reading_upstream`], with the count of connections it has accepted; it holds
/// its answer to `/slow` for 300ms before reading the body, to `/late` for 700ms after.
async fn counting_body_reader() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let service = hyper::service::service_fn(
                |request: http::Request<hyper::body::Incoming>| async move {
                    if request.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let late = request.uri().path() == "/late";
                    let body = request.into_body().collect().await?.to_bytes();
                    if late {
                        tokio::time::sleep(Duration::from_millis(700)).await;
                    }
                    Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from(format!(
                        "read {} bytes",
                        body.len()
                    )))))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, accepted)
}

/// A gateway of one worker (one pool of upstream connections) forwarding other routes to
/// `upstream`.
async fn one_worker_forwarding_to(upstream: SocketAddr) -> Gateway {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let config = yaml(
        &format!("http://{upstream}"),
        "  other_routes: forward\n",
        "",
    );
    Gateway::start_yaml(mock, &with_server_keys(&config, "  workers: 1\n")).await
}

/// A body that keeps arriving is passed on however long it takes in all: only each wait
/// for more of it is bounded by `upstream.timeout` (400ms here), not the whole upload. (A
/// body over 64 KiB, which is streamed rather than read whole first.)
#[tokio::test]
async fn an_upload_that_keeps_arriving_is_passed_on_however_long_it_takes() {
    let (upstream, _) = counting_body_reader().await;
    let gw = one_worker_forwarding_to(upstream).await;
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client
        .write_all(b"POST /users.json HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    // 5,000 bytes every 50ms: a second in all, each wait far inside the 400ms.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(&[b'x'; 5000]).await.unwrap();
    }
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut bytes))
        .await
        .expect("answered within 10s")
        .unwrap();
    let reply = parse(&bytes);
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "read 100000 bytes")
    );
}

/// A client that opens more streams than the gateway allows before its SETTINGS arrive
/// (hyper's client opens up to 100), all held open by QuickBlox, gets the surplus refused,
/// not its connection closed: the refusals must not count as the stream errors that
/// close one.
#[tokio::test]
async fn an_http2_burst_over_the_stream_limit_keeps_its_connection() {
    let (upstream, _) = counting_body_reader().await;
    let gw = one_worker_forwarding_to(upstream).await;
    let sender = h2_connect(gw.addr).await;
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..80 {
        let mut sender = sender.clone();
        let request = http::Request::get(format!("http://{}/slow", gw.addr))
            .body(Empty::new())
            .unwrap();
        burst.spawn(async move { sender.send_request(request).await.is_ok() });
    }
    let answered = burst.join_all().await.into_iter().filter(|ok| *ok).count();
    assert!(answered >= 32, "{answered} of 80 answered");
    let mut sender = sender;
    let request = http::Request::get(format!("http://{}/users.json", gw.addr))
        .body(Empty::new())
        .unwrap();
    let after = sender.send_request(request).await;
    assert_eq!(after.expect("the connection is still open").status(), 200);
}

/// A body still arriving when `server.request_timeout` (1s here) is up is the client's
/// slowness (408 `client_body_timeout`), not QuickBlox's lateness (504), whether it was
/// being read whole (small) or streamed.
#[tokio::test]
async fn a_body_still_arriving_at_the_request_timeout_is_the_clients() {
    let (upstream, _) = counting_body_reader().await;
    let mock = MockServer::start(mock_config()).await.unwrap();
    let config = yaml(
        &format!("http://{upstream}"),
        "  other_routes: forward\n",
        "",
    );
    let config = with_server_keys(&config, "  workers: 1\n  request_timeout: 1s\n");
    let gw = Gateway::start_yaml(mock, &config).await;
    for length in [100, 100_000] {
        let mut client = TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST /users.json HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n"
        );
        client.write_all(head.as_bytes()).await.unwrap();
        // A byte every 100ms: never a wait as long as upstream.timeout, never done.
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 1024];
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if client.write_all(b"x").await.is_err() {
                break;
            }
            if let Ok(Ok(n @ 1..)) =
                tokio::time::timeout(Duration::from_millis(1), client.read(&mut chunk)).await
            {
                bytes.extend_from_slice(&chunk[..n]);
                break;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut bytes)).await;
        assert_eq!(parse(&bytes).status, 408, "{length} bytes");
    }
}

/// A streamed body's answer gets `upstream.timeout` (400ms here) from the body's last
/// part, not more: QuickBlox answering 700ms after it read the body is late.
#[tokio::test]
async fn a_streamed_bodys_answer_gets_the_timeout_from_the_bodys_end() {
    let (upstream, _) = counting_body_reader().await;
    let gw = one_worker_forwarding_to(upstream).await;
    let body = "x".repeat(70_000);
    let request = format!(
        "POST /late HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\nContent-Length: 70000\r\n\r\n{body}"
    );
    assert_eq!(raw(gw.addr, request.as_bytes()).await.status, 504);
}

/// A request body of one chunk of data, then (if `trailers`) a trailer, whose end comes
/// in a frame of its own: as a streaming HTTP/2 client ends a stream with an empty DATA
/// frame after its data.
struct EndApart {
    data: Option<Bytes>,
    trailers: bool,
}

impl http_body::Body for EndApart {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let frame = match self.data.take() {
            Some(data) => Some(http_body::Frame::data(data)),
            None if std::mem::take(&mut self.trailers) => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-sum", http::HeaderValue::from_static("1"));
                Some(http_body::Frame::trailers(trailers))
            }
            None => None,
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}

/// Uploads that end by their declared length (the end of the stream coming after it), or
/// with trailers, leave their upstream connection for the next request, as uploads that
/// end with their last byte do.
#[tokio::test]
async fn uploads_ending_by_length_or_trailers_keep_their_upstream_connection() {
    let (upstream, accepted) = counting_body_reader().await;
    let gw = one_worker_forwarding_to(upstream).await;
    let trailed = "POST /users.json HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\
                   Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n";
    for _ in 0..3 {
        let reply = raw(gw.addr, trailed.as_bytes()).await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "read 5 bytes"));
    }
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    for trailers in [false, false, true] {
        let mut request = http::Request::post(format!("http://{}/users.json", gw.addr));
        if !trailers {
            request = request.header("content-length", "70000");
        }
        // Over 64 KiB: streamed, not read whole first.
        let body = EndApart {
            data: Some(Bytes::from(vec![b'h'; 70_000])),
            trailers,
        };
        let answer = sender.send_request(request.body(body).unwrap()).await;
        let body = answer.unwrap().into_body().collect().await.unwrap();
        assert_eq!(body.to_bytes(), "read 70000 bytes");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection"
    );
}

/// A client that breaks off a streamed body (over 64 KiB) fails its own exchange only: the
/// worker's other kept upstream connections stay for the next requests (they were dropped
/// as if QuickBlox had closed them all). A small body broken off never reaches QuickBlox.
#[tokio::test]
async fn a_body_broken_off_drops_only_its_own_upstream_connection() {
    let (upstream, accepted) = counting_body_reader().await;
    let gw = one_worker_forwarding_to(upstream).await;
    let slow = b"GET /slow HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n";
    // Two at once: two upstream connections, both kept once answered.
    let (a, b) = tokio::join!(raw(gw.addr, slow), raw(gw.addr, slow));
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let broken = |length: usize| async move {
        let head = format!(
            "POST /users.json HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: {length}\r\n\r\nabc"
        );
        let mut client = TcpStream::connect(gw.addr).await.unwrap();
        client.write_all(head.as_bytes()).await.unwrap();
        client.shutdown().await.unwrap();
        let mut bytes = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut bytes))
            .await
            .expect("answered within 10s")
            .unwrap();
        parse(&bytes).status
    };
    for _ in 0..3 {
        assert_eq!(broken(100).await, 400);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "small bodies are read first"
    );
    assert_eq!(broken(100_000).await, 400);
    let reply = raw(
        gw.addr,
        b"GET /users.json HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the other kept connection was used"
    );
}

#[tokio::test]
async fn a_body_the_client_broke_is_the_clients_error() {
    let upstream = body_reading_upstream().await;
    let gw = gateway_before(&format!("http://{upstream}"), "  other_routes: forward\n").await;
    let post = "POST /users.json HTTP/1.1\r\nHost: gateway.test\r\n";
    let cases = [
        (
            "non-hex chunk size",
            format!("{post}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "chunk size overflow",
            format!("{post}Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ),
        (
            "chunk data longer than its size",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n"),
        ),
        (
            "body cut short before its Content-Length",
            format!("{post}Content-Length: 100\r\n\r\nabc"),
        ),
    ];
    for (what, request) in &cases {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        // The client is done sending: a cut-short body ends here.
        stream.shutdown().await.unwrap();
        let mut bytes = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
            .await
            .expect("answered within 10s")
            .unwrap();
        let (answers, _) = read_answers(&bytes);
        assert_eq!(
            answers.first().map(|a| (a.status, a.body.as_str())),
            Some((400, BAD_BODY)),
            "{what}: {answers:?}"
        );
    }
    // A well-formed chunked body still goes through.
    let fine = format!(
        "{post}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{}",
        chunked("hello")
    );
    let reply = raw(gw.addr, fine.as_bytes()).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "read 5 bytes"));
    // On a GET too (hyper's client would send a GET's chunked body as none).
    let get = fine.replacen("POST", "GET", 1);
    let reply = raw(gw.addr, get.as_bytes()).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "read 5 bytes"));

    // A body that stops arriving is the client's too: 408 once QuickBlox's timeout is up.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(format!("{post}Content-Length: 100\r\n\r\nabc").as_bytes())
        .await
        .unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("answered within 10s")
        .unwrap();
    assert_eq!(read_answers(&bytes).0[0].status, 408);

    let metrics = gw.admin_get("/metrics").await.body;
    let count = |outcome: &str| {
        sample(
            &metrics,
            &format!(r#"reset_gateway_requests_total{{outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(count("client_body_invalid"), Some(cases.len() as f64));
    assert_eq!(count("client_body_timeout"), Some(1.0));
    assert_eq!(count("upstream_unavailable"), Some(0.0));
    assert_eq!(count("upstream_timeout"), Some(0.0));
}

#[tokio::test]
async fn a_preface_sent_in_pieces_is_served_and_one_never_finished_is_dropped() {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const EMPTY_SETTINGS: &[u8] = b"\0\0\0\x04\0\0\0\0\0";
    let gw = Gateway::start("").await;

    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(&PREFACE[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(&PREFACE[10..]).await.unwrap();
    stream.write_all(EMPTY_SETTINGS).await.unwrap();
    // The server's own SETTINGS frame: a 9-byte frame header of type 4.
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut frame))
        .await
        .expect("HTTP/2 answered within 10s")
        .unwrap();
    assert_eq!(frame[3], 4, "a SETTINGS frame: {frame:?}");

    // header_read_timeout is 300ms: a preface that never ends is closed then.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(&PREFACE[..10]).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the gateway dropped the connection")
        .unwrap();
    assert!(rest.is_empty());
}

/// A header QuickBlox's answer names in its own Connection header is hop-by-hop: not
/// passed to the client even where the reset's answer would keep it.
#[tokio::test]
async fn headers_quickbloxs_connection_names_stay_behind_on_the_reset_path() {
    let upstream = RawUpstream::start(
        "HTTP/1.1 200 OK\r\nConnection: Content-Language\r\nContent-Language: de\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            .to_owned(),
    )
    .await;
    let gw = gateway_before(&upstream.url(), "  responses:\n    uniform: false\n").await;
    let reply = gw
        .reset("email=alice%40example.com", &[("QB-Token", IOS_TOKEN)])
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.header("content-language").is_none(), "{reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
}

/// An answer to HEAD on a forwarded route keeps QuickBlox's Content-Length (the size a
/// GET would get), and no body.
#[tokio::test]
async fn a_head_answer_keeps_its_content_length() {
    let upstream = RawUpstream::start(
        "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nConnection: close\r\n\r\n".to_owned(),
    )
    .await;
    let gw = gateway_before(&upstream.url(), "  other_routes: forward\n").await;
    let reply = raw(
        gw.addr,
        b"HEAD /users.json HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-length"), Some("1234"), "{reply:?}");
    assert!(reply.body.is_empty(), "{reply:?}");
}

/// A body in a transfer coding other than chunked would lose its coding when the gateway
/// frames it anew, and reach the other side as if plain: a client's is refused with 501
/// (as nginx does), QuickBlox's answered as a bad gateway.
#[tokio::test]
async fn transfer_codings_other_than_chunked_are_refused_both_ways() {
    let gw = Gateway::start("  other_routes: forward\n").await;
    let request = "POST /users.json HTTP/1.1\r\nHost: gateway.test\r\n\
                   Transfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let reply = raw(gw.addr, request.as_bytes()).await;
    assert_eq!(reply.status, 501, "{reply:?}");
    assert!(gw.mock.requests().is_empty());
    // Chunked alone, in any case, is passed on.
    let chunked = request.replace("gzip, chunked", "Chunked");
    assert_ne!(raw(gw.addr, chunked.as_bytes()).await.status, 501);

    let upstream = RawUpstream::start(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nnot plain"
            .to_owned(),
    )
    .await;
    let gw = gateway_before(&upstream.url(), "  other_routes: forward\n").await;
    let reply = raw(
        gw.addr,
        b"GET /users.json HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert!(!reply.body.contains("not plain"), "{reply:?}");
}

/// QuickBlox sends a forwarded route's answer head and part of its body, then nothing,
/// its connection left open: the client's connection is closed once the body has been
/// idle for `upstream.timeout` (400ms here), not held for as long as QuickBlox's is.
#[tokio::test]
async fn a_forwarded_answer_whose_body_stalls_is_cut_after_the_upstream_timeout() {
    let upstream = RawUpstream::start_with(
        "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"ok\":1}".to_owned(),
        false,
    )
    .await;
    let gw = gateway_before(&upstream.url(), "  other_routes: forward\n").await;
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client
        .write_all(b"GET /users.json HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    // A guard against a hang, far beyond the 400ms the gateway is given.
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = [0u8; 1024];
        loop {
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection was held open");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("{\"ok\":1}"),
        "only what QuickBlox sent: {text}"
    );
}

/// An upstream that answers each request as soon as it has read its head (as nginx answers
/// an error), then reads the request's body (by its Content-Length) and discards it before
/// the next request on the connection.
async fn early_answerer() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                loop {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let length: u64 = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length:"))
                        .map_or(0, |n| n.trim().parse().unwrap());
                    let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut body = (&mut stream).take(length);
                    match tokio::io::copy(&mut body, &mut tokio::io::sink()).await {
                        Ok(read) if read == length => {}
                        _ => return,
                    }
                }
            });
        }
    });
    addr
}

/// A client that starts a body on a forwarded route and never finishes it, answered
/// before its body by QuickBlox: the upstream connection, still waiting to send that body,
/// is not given to the next request (which would wait behind it until `upstream.timeout`
/// and get a 504 blamed on QuickBlox), and the client's connection is closed once its
/// body has sent nothing for `upstream.timeout` (400ms here), not held open for as long
/// as QuickBlox keeps reading.
#[tokio::test]
async fn a_body_never_finished_holds_neither_its_connection_nor_the_next_request() {
    let upstream = early_answerer().await;
    let mock = MockServer::start(mock_config()).await.unwrap();
    let config = yaml(
        &format!("http://{upstream}"),
        "  other_routes: forward\n",
        "",
    );
    let gw = Gateway::start_yaml(mock, &with_server_keys(&config, "  workers: 1\n")).await;
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client
        .write_all(b"POST /users.json HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 1000000\r\n\r\npart")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with("ok") {
        let n = client.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the answer: {got:?}");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");

    for _ in 0..3 {
        let reply = raw(
            gw.addr,
            b"GET /users.json HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }

    // A guard against a hang, far beyond the 400ms the gateway is given.
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(n @ 1..) = client.read(&mut chunk).await {
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was held open");
}

/// The gateway's own client tokens never reach QuickBlox on a forwarded route (an app may
/// send its token with every request, in the header QuickBlox reads its session token
/// from); QuickBlox's own tokens, and other credentials, pass.
#[tokio::test]
async fn a_client_token_of_the_gateway_never_crosses_to_quickblox_on_forwarded_routes() {
    let gw = Gateway::start("  other_routes: forward\n").await;
    let cases = [
        (format!("QB-Token: {IOS_TOKEN}"), None),
        (format!("Authorization: ApiKey  {WEB_TOKEN} "), None),
        (
            "QB-Token: a-quickblox-session-token".to_owned(),
            Some(("qb-token", "a-quickblox-session-token")),
        ),
        (
            format!("Authorization: Bearer {IOS_TOKEN}"),
            Some(("authorization", "Bearer ios-client-token-1a2b3c")),
        ),
    ];
    for (i, (header, crossed)) in cases.iter().enumerate() {
        let request = format!(
            "GET /users.json HTTP/1.1\r\nHost: gateway.test\r\n{header}\r\nConnection: close\r\n\r\n"
        );
        raw(gw.addr, request.as_bytes()).await;
        let seen = &gw.mock.requests()[i].headers;
        assert!(seen.get("x-forwarded-for").is_some(), "{seen:?}");
        match crossed {
            None => {
                assert!(seen.get("qb-token").is_none(), "{header}: {seen:?}");
                assert!(seen.get("authorization").is_none(), "{header}: {seen:?}");
            }
            Some((name, value)) => assert_eq!(seen[*name], *value, "{header}"),
        }
    }
}

#[tokio::test]
async fn only_end_to_end_headers_cross_to_quickblox_on_forwarded_routes() {
    let gw = Gateway::start("  other_routes: forward\n").await;
    let request = "POST /users.json HTTP/1.1\r\nHost: gateway.test\r\n\
                   Connection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
                   Expect: 100-continue\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
                   X-Forwarded-For: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nCF-Connecting-IP: 6.6.6.6\r\n\
                   X-Kept: 1\r\nContent-Length: 5\r\n\r\nhello";
    raw(gw.addr, request.as_bytes()).await;
    let seen = &gw.mock.requests()[0].headers;
    for dropped in [
        "connection",
        "x-secret",
        "keep-alive",
        "te",
        "expect",
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "transfer-encoding",
    ] {
        assert!(seen.get(dropped).is_none(), "{dropped} crossed: {seen:?}");
    }
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-kept"], "1");
    // Framed by the gateway from the body it sends.
    assert_eq!(seen["content-length"], "5");
}

#[tokio::test]
async fn behind_a_trusted_proxy_other_paths_name_the_client_it_forwarded_for() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let guard = "  other_routes: forward\n  client_ip:\n    trusted_proxies: [127.0.0.0/8]\n";
    std::fs::write(&path, yaml(&mock.url(), guard, "")).unwrap();
    let gw = crate::process::spawn_gateway(&path);
    // The proxy appended the client's address to what the client wrote.
    let from_proxy = |method: &str, target: &str| {
        format!(
            "{method} {target} HTTP/1.1\r\nHost: gateway.test\r\n\
             X-Forwarded-For: 6.6.6.6, 198.51.100.9\r\nConnection: close\r\n\r\n"
        )
    };
    let status = async |method, target| {
        raw(gw.addr, from_proxy(method, target).as_bytes())
            .await
            .status
    };
    // Passed on (QuickBlox, here its stand-in, knows no such path).
    assert_eq!(status("GET", "/users.json").await, 404);
    assert_eq!(mock.requests().len(), 1);
    // Answered by the guard before any limit: a spelling of the reset path, a method.
    assert_eq!(status("GET", "/users//password/reset.json").await, 404);
    assert_eq!(status("POST", "/users/password/reset.json").await, 405);
    // Refused by the gateway before the guard: a target too long, no Host.
    let long = format!("/users.json?{}", "x".repeat(9000));
    assert_eq!(status("GET", &long).await, 414);
    let no_host =
        "GET /users.json HTTP/1.1\r\nX-Forwarded-For: 198.51.100.9\r\nConnection: close\r\n\r\n";
    assert_eq!(raw(gw.addr, no_host.as_bytes()).await.status, 400);

    // QuickBlox is told of the client first, then of the proxy; never of what the client wrote.
    let seen = &mock.requests()[0].headers;
    assert_eq!(seen["x-forwarded-for"], "198.51.100.9, 127.0.0.1");
    let access = gw.access_lines_once(5).await;
    assert_eq!(access.len(), 5, "{access:#?}");
    for line in access {
        assert_eq!(line["client_ip"], "198.51.100.9", "{line}");
    }
}
