//! The embedding example (`examples/axum.rs`) served on a loopback port and asked over
//! real TCP connections, from distinct loopback addresses where the peer matters.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use reset_guard::ApiKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

// The example's `main` is not called here; its router and `serve` are.
#[allow(dead_code)]
#[path = "../examples/axum.rs"]
mod example;

/// Serves the example app on a fresh port: as the example does, or with plain
/// `axum::serve`, which gives requests no peer address.
async fn start(with_peer_address: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = example::app(ApiKey::new("server-key").unwrap());
    if with_peer_address {
        tokio::spawn(example::serve(listener, app));
    } else {
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    addr
}

/// A loopback address other than the server's: Linux routes all of 127/8 to `lo`.
fn client(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// One HTTP/1.1 request over a new connection from `from`: the status and the body.
/// `head` is the method and target, then any header lines.
async fn ask(server: SocketAddr, from: IpAddr, head: &str, body: &str) -> (u16, String) {
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap();
    let headers: String = lines.map(|h| format!("{h}\r\n")).collect();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut stream = socket.connect(server).await.unwrap();
    let length = match body.len() {
        0 => String::new(),
        n => format!("Content-Length: {n}\r\n"),
    };
    let request = format!(
        "{line} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n{headers}{length}\r\n{body}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer[9..12].parse().unwrap();
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    (status, body.to_owned())
}

/// A reset for `email` with the example client's token.
async fn reset(server: SocketAddr, from: IpAddr, email: &str) -> (u16, String) {
    let head = format!("GET /users/password/reset.json?email={email}\r\nQB-Token: foo");
    ask(server, from, &head, "").await
}

const RESET_OK: &str = "reset requested by example-app for a valid address\n";

#[tokio::test]
async fn the_apps_other_routes_answer_with_their_own_handlers() {
    let server = start(true).await;
    let me = client(2);
    assert_eq!(ask(server, me, "GET /health", "").await, (200, "ok".into()));
    assert_eq!(
        ask(server, me, "POST /notes", "hello").await,
        (200, "noted 5 bytes\n".into())
    );
    // The app's own not-found answer, not the guard's JSON one.
    assert_eq!(
        ask(server, me, "GET /nothing-here", "").await,
        (404, "".into())
    );

    // The reset route: the guard answers what it refuses, the handler the rest.
    assert_eq!(reset(server, me, "a%40b.io").await, (200, RESET_OK.into()));
    assert_eq!(
        reset(server, me, "not-an-address").await,
        (422, r#"{"errors":{"email":["is invalid"]}}"#.into())
    );
    let head = "GET /users/password/reset.json?email=a%40b.io\r\nQB-Token: bar";
    assert_eq!(ask(server, me, head, "").await.0, 401);
}

#[tokio::test]
async fn each_client_address_has_its_own_per_ip_bucket() {
    let server = start(true).await;
    let (greedy, other) = (client(3), client(4));
    // Distinct addresses, so only the per-IP limit (20 a minute in the example) is reached.
    for i in 0..20 {
        let email = format!("user{i}%40example.com");
        assert_eq!(reset(server, greedy, &email).await.0, 200, "request {i}");
    }
    assert_eq!(reset(server, greedy, "late%40example.com").await.0, 429);

    assert_eq!(
        reset(server, other, "other%40example.com").await,
        (200, RESET_OK.into())
    );
    // The limit is the reset route's: the greedy client's other requests still work.
    assert_eq!(ask(server, greedy, "GET /health", "").await.0, 200);
}

#[tokio::test]
async fn without_a_peer_address_resets_are_refused_not_bucketed_together() {
    let server = start(false).await;
    // More than the per-IP quota, from two addresses the guard cannot see: every one is
    // refused with 500, none reaches the handler, and none is a 429 from a shared bucket.
    for i in 0..25 {
        let from = client(5 + i % 2);
        let email = format!("user{i}%40example.com");
        assert_eq!(
            reset(server, from, &email).await,
            (
                500,
                r#"{"errors":{"base":["Internal server error"]}}"#.into()
            ),
            "request {i}"
        );
    }
    // The rest of the app does not need the peer address.
    assert_eq!(
        ask(server, client(5), "GET /health", "").await,
        (200, "ok".into())
    );
}

#[test]
fn the_readme_embedding_snippet_is_the_tested_example() {
    let readme = include_str!("../../../README.md");
    let example = include_str!("../examples/axum.rs");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Embedding the layer"))
        .expect("README has an embedding section");
    let snippets: Vec<&str> = section
        .split("```rust\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .collect();
    assert!(!snippets.is_empty());
    for snippet in snippets {
        assert!(
            example.contains(snippet),
            "README snippet differs from examples/axum.rs:\n{snippet}"
        );
    }
}
