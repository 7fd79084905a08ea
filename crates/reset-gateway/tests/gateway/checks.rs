//! Every rejection of the guard's steps (ARCHITECTURE.md, "The request's path"), the key
//! swap, uniform answers.

use crate::common::*;

const JSON: &str = "application/json; charset=utf-8";

/// (method, target, headers, body, expected status, expected body)
type Case<'a> = (
    &'a str,
    String,
    Vec<(&'a str, &'a str)>,
    &'a str,
    u16,
    &'a str,
);

#[tokio::test]
async fn every_rejection_row_is_answered_by_the_gateway() {
    let gw = Gateway::start("").await;
    let ios = ("QB-Token", IOS_TOKEN);
    let api = ("Authorization", "ApiKey ios-client-token-1a2b3c");
    let cases: Vec<Case> = vec![
        (
            "GET",
            "/users.json".into(),
            vec![ios],
            "",
            404,
            r#"{"errors":{"base":["Not found"]}}"#,
        ),
        (
            "POST",
            format!("{RESET}?email=alice%40example.com"),
            vec![ios, ("Content-Length", "0")],
            "",
            405,
            r#"{"errors":{"base":["Method not allowed"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=alice%40example.com"),
            vec![ios, ("Content-Length", "5")],
            "hello",
            400,
            r#"{"errors":{"base":["GET request must not have a body"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=alice%40example.com"),
            vec![ios, ("Transfer-Encoding", "chunked")],
            "0\r\n\r\n",
            400,
            r#"{"errors":{"base":["GET request must not have a body"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=alice%40example.com&email=bob%40example.com"),
            vec![ios],
            "",
            400,
            r#"{"errors":{"base":["email parameter given more than once"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=alice%40example.com"),
            vec![ios, api],
            "",
            400,
            r#"{"errors":{"base":["Send exactly one of QB-Token and Authorization"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=alice%40example.com"),
            vec![ios, ios],
            "",
            400,
            r#"{"errors":{"base":["QB-Token header given more than once"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=alice%40example.com"),
            vec![api, api],
            "",
            400,
            r#"{"errors":{"base":["Authorization header given more than once"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=alice%40example.com"),
            vec![],
            "",
            401,
            r#"{"errors":{"base":["QB-Token or Authorization header is required"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=alice%40example.com"),
            vec![("Authorization", "Bearer ios-client-token-1a2b3c")],
            "",
            401,
            r#"{"errors":{"base":["Authorization scheme must be ApiKey"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=alice%40example.com"),
            vec![("QB-Token", "guessed")],
            "",
            401,
            r#"{"errors":{"base":["Unknown client token"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=alice%40example.com"),
            vec![("Authorization", "ApiKey guessed")],
            "",
            401,
            r#"{"errors":{"base":["Unknown client token"]}}"#,
        ),
        (
            "GET",
            RESET.into(),
            vec![ios],
            "",
            422,
            r#"{"errors":{"email":["is required"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?mail=alice%40example.com"),
            vec![ios],
            "",
            422,
            r#"{"errors":{"email":["is required"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=alice"),
            vec![ios],
            "",
            422,
            r#"{"errors":{"email":["is invalid"]}}"#,
        ),
        (
            "GET",
            format!("{RESET}?email=%FF%40example.com"),
            vec![ios],
            "",
            422,
            r#"{"errors":{"email":["is invalid"]}}"#,
        ),
    ];
    for (method, target, headers, body, status, expected) in cases {
        let reply = gw.send(method, &target, &headers, body).await;
        let what = format!("{method} {target} {headers:?}");
        assert_eq!(reply.status, status, "{what}: {reply:?}");
        assert_eq!(reply.body, expected, "{what}");
        assert_eq!(reply.header("content-type"), Some(JSON), "{what}");
        assert!(
            reply
                .header("x-request-id")
                .is_some_and(|id| !id.is_empty()),
            "{what}"
        );
        if status == 405 {
            assert_eq!(reply.header("allow"), Some("GET"));
        }
    }
    assert!(
        gw.mock.requests().is_empty(),
        "no rejected request may reach QuickBlox"
    );
}

#[tokio::test]
async fn the_client_token_is_swapped_for_the_server_key() {
    let gw = Gateway::start("").await;
    let reply = gw
        .reset(
            "email=Bob%2Bnews%40Example.com&admin=true",
            &[
                ("QB-Token", IOS_TOKEN),
                ("Cookie", "session=abc"),
                ("User-Agent", "ios-app/1.0"),
                ("X-Trace", "t-1"),
                ("X-Internal", "leak"),
                ("X-Request-Id", "req-42"),
                ("X-Forwarded-For", "6.6.6.6"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-request-id"), Some("req-42"));

    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 1);
    let upstream = &seen[0];
    assert_eq!(upstream.path, RESET);
    assert_eq!(
        upstream.query.as_deref(),
        Some("email=Bob%2Bnews@Example.com")
    );
    assert_eq!(upstream.email().as_deref(), Some("Bob+news@Example.com"));
    let h = &upstream.headers;
    assert_eq!(h["authorization"], format!("ApiKey {SERVER_KEY}"));
    assert!(h.get("qb-token").is_none());
    assert!(h.get("cookie").is_none());
    assert!(h.get("x-internal").is_none());
    assert_eq!(h["user-agent"], "ios-app/1.0");
    assert_eq!(h["x-trace"], "t-1");
    assert_eq!(h["x-request-id"], "req-42");
    // The peer is not a trusted proxy, so its own claim is dropped.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    let all: String = h.iter().map(|(n, v)| format!("{n}: {v:?}\n")).collect();
    assert!(!all.contains(IOS_TOKEN), "{all}");
}

#[tokio::test]
async fn the_api_key_form_works_and_never_leaks_back() {
    let gw = Gateway::start("").await;
    let reply = gw
        .reset(
            "email=alice%40example.com",
            &[("Authorization", &format!("apikey {WEB_TOKEN}"))],
        )
        .await;
    assert_eq!(reply.status, 200);
    let everything = format!("{reply:?}");
    assert!(!everything.contains(SERVER_KEY) && !everything.contains(WEB_TOKEN));
    assert_eq!(
        gw.mock.requests()[0].headers["authorization"],
        format!("ApiKey {SERVER_KEY}")
    );
}

#[tokio::test]
async fn connection_named_headers_are_not_forwarded() {
    let gw = Gateway::start("").await;
    let reply = gw
        .reset(
            "email=alice%40example.com",
            &[
                ("QB-Token", IOS_TOKEN),
                ("X-Trace", "t-1"),
                ("Connection", "close, X-Trace"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(gw.mock.requests()[0].headers.get("x-trace").is_none());
}

#[tokio::test]
async fn trusted_proxies_extend_the_forwarding_chain() {
    let gw = Gateway::start("  client_ip:\n    trusted_proxies: [127.0.0.0/8]\n").await;
    let reply = gw
        .reset(
            "email=alice%40example.com",
            &[("QB-Token", IOS_TOKEN), ("X-Forwarded-For", "198.51.100.7")],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        gw.mock.requests()[0].headers["x-forwarded-for"],
        "198.51.100.7, 127.0.0.1"
    );
    // What the client wrote left of its proxy's entry never reaches QuickBlox, where a
    // reader of the leftmost entry would believe it.
    gw.reset(
        "email=alice%40example.com",
        &[
            ("QB-Token", IOS_TOKEN),
            (
                "X-Forwarded-For",
                "1.2.3.4, <script>, 127.0.0.9, 198.51.100.7",
            ),
        ],
    )
    .await;
    assert_eq!(
        gw.mock.requests()[1].headers["x-forwarded-for"],
        "198.51.100.7, 127.0.0.1"
    );
}

#[tokio::test]
async fn uniform_answers_hide_whether_an_account_exists() {
    let gw = Gateway::start("").await;
    let known = gw.reset_as_ios("email=alice%40example.com").await;
    let unknown = gw.reset_as_ios("email=nobody%40example.com").await;
    assert_eq!((known.status, known.body.as_str()), (200, ""));
    assert_eq!(known.stable_headers(), unknown.stable_headers());
    assert_eq!(known.body, unknown.body);
    assert_eq!(unknown.status, 200);

    // QuickBlox's 401 (say, a revoked server key) is hidden the same way.
    let mut config = mock_config();
    config.api_key = "rotated-elsewhere".into();
    let gw = Gateway::start_with(config, "", "").await;
    let denied = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(denied.stable_headers(), known.stable_headers());
    assert_eq!((denied.status, denied.body.as_str()), (200, ""));
}

#[tokio::test]
async fn uniform_off_passes_quickblox_answers_through() {
    let gw = Gateway::start("  responses:\n    uniform: false\n").await;
    let known = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!((known.status, known.body.as_str()), (200, ""));
    let unknown = gw.reset_as_ios("email=nobody%40example.com").await;
    assert_eq!((unknown.status, unknown.body.as_str()), (404, "null"));
}

#[tokio::test]
async fn other_routes_can_be_forwarded_untouched() {
    let gw = Gateway::start("  other_routes: forward\n").await;
    let reply = gw
        .send(
            "GET",
            "/users.json?page=2",
            &[("QB-Token", "user-session"), ("Keep-Alive", "timeout=5")],
            "",
        )
        .await;
    assert_eq!(reply.status, 404); // qb-mock knows no /users.json
    let seen = gw.mock.requests();
    assert_eq!(seen[0].path, "/users.json");
    assert_eq!(seen[0].query.as_deref(), Some("page=2"));
    assert_eq!(seen[0].headers["qb-token"], "user-session");
    assert!(seen[0].headers.get("keep-alive").is_none());
    // A spelling that QuickBlox could route to the reset action is never forwarded.
    let sneaky = gw
        .send(
            "GET",
            "/users/password/reset%2Ejson?email=a%40b.io",
            &[],
            "",
        )
        .await;
    assert_eq!(sneaky.status, 404);
    assert_eq!(gw.mock.requests().len(), 1);
    // A tunnel or a target that is no path would reach QuickBlox as something else.
    for head in [
        "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: x\r\n",
        "TRACE /users.json HTTP/1.1\r\nHost: x\r\nCookie: session=1\r\n",
        "GET evil.example:80 HTTP/1.1\r\n",
        "POST evil.example:80 HTTP/1.1\r\nContent-Length: 0\r\n",
    ] {
        let reply = raw(
            gw.addr,
            format!("{head}Connection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(reply.status, 400, "{head}");
    }
    assert_eq!(gw.mock.requests().len(), 1);
    // The gateway's request id goes upstream even if the client's Connection names it.
    gw.send("GET", "/users.json", &[("Connection", "x-request-id")], "")
        .await;
    assert_eq!(gw.mock.requests()[1].headers["x-request-id"].len(), 32);
    // QuickBlox's answer to a route passed through is not an answer to a reset: the
    // upstream status counts (and the alert on its 401s) are the resets' alone.
    let metrics = gw.admin_get("/metrics").await.body;
    assert!(
        !metrics.contains("reset_gateway_upstream_responses_total{"),
        "{metrics}"
    );
    assert_eq!(gw.reset_as_ios(&format!("email={ALICE}")).await.status, 200);
    let metrics = gw.admin_get("/metrics").await.body;
    assert_eq!(
        sample(
            &metrics,
            r#"reset_gateway_upstream_responses_total{status="200"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_sane_request_id_is_kept_and_a_hostile_one_replaced() {
    let gw = Gateway::start("").await;
    let reply = gw.reset("email=x", &[("X-Request-Id", "abc-123")]).await;
    assert_eq!(reply.header("x-request-id"), Some("abc-123"));
    let reply = gw
        .reset("email=x", &[("X-Request-Id", "<script>alert(1)</script>")])
        .await;
    let id = reply.header("x-request-id").unwrap();
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[tokio::test]
async fn http2_cleartext_is_served() {
    use http_body_util::{BodyExt, Empty};

    let gw = Gateway::start("").await;
    let mut sender = h2_connect(gw.addr).await;
    let request = h2_reset(gw.addr, "email=alice%40example.com")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert!(response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .is_empty());
    assert_eq!(
        gw.mock.requests()[0].headers["authorization"],
        format!("ApiKey {SERVER_KEY}")
    );
}

/// An answer to HEAD over HTTP/2 has no body (a DATA frame there is a protocol error to
/// the client), and the `Content-Length` a GET's answer would have.
#[tokio::test]
async fn http2_answers_to_head_have_no_body() {
    use http_body_util::{BodyExt, Empty};

    let gw = Gateway::start("").await;
    // The same answer as to HEAD, with its body: a GET's to a path with no route, a POST's
    // to the reset path (HEAD is not GET there).
    for (path, method, status) in [("/nothing", "GET", 404), (RESET, "POST", 405)] {
        let get = gw.send(method, path, &[], "").await;
        assert_eq!(get.status, status);
        assert!(!get.body.is_empty());
        let mut sender = h2_connect(gw.addr).await;
        let request = http::Request::head(format!("http://{}{path}", gw.addr))
            .body(Empty::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), status);
        let length = response.headers()[http::header::CONTENT_LENGTH].clone();
        assert_eq!(length.to_str().unwrap(), get.body.len().to_string());
        let body = response.into_body().collect().await;
        assert!(body.unwrap().to_bytes().is_empty(), "{path}");
    }
}

#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start("").await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /users/password/reset.json HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // header_read_timeout is 300ms; the rest of the head never comes.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut rest),
    )
    .await;
    assert!(
        read.is_ok(),
        "the gateway kept a slow client's connection open"
    );
    assert!(gw.mock.requests().is_empty());
}

/// QuickBlox's answers to resets pass through with their status and body, but only the
/// headers a client of the gateway needs; and an answer that hands the API key back is
/// withheld.
#[tokio::test]
async fn quickblox_answers_pass_without_their_other_headers_or_the_key() {
    use http_body_util::Full;

    let upstream = upstream_answering(|request| {
        let query = request.uri().query().unwrap_or("").to_owned();
        let echo = query.contains("echo") || query.contains("gone");
        let status = if query.contains("gone") { 404 } else { 500 };
        let key = request.headers()["authorization"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = if echo {
            format!("{{\"errors\":[\"bad {key}\"]}}")
        } else {
            "{\"errors\":[\"down\"]}".to_owned()
        };
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("retry-after", "5")
            .header("set-cookie", "qb_session=abc")
            .header("location", "https://elsewhere.example/")
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap()
    })
    .await;
    let gw = Gateway::start_upstream(&upstream, "").await;

    let reply = gw.reset_as_ios("email=alice%40example.com").await;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.body, "{\"errors\":[\"down\"]}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("retry-after"), Some("5"));
    assert_eq!(reply.header("set-cookie"), None);
    assert_eq!(reply.header("location"), None);

    let reply = gw.reset_as_ios("email=echo%40example.com").await;
    assert_eq!(reply.status, 502);
    assert!(!reply.body.contains(SERVER_KEY));
    assert!(reply.headers.iter().all(|(_, v)| !v.contains(SERVER_KEY)));

    // A 404 the uniform answer replaces shows nothing of itself, the key included: withheld
    // as a 502 instead, it would tell this address from one with an account.
    let reply = gw.reset_as_ios("email=gone%40example.com").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, ""));
    assert!(reply.headers.iter().all(|(_, v)| !v.contains(SERVER_KEY)));
}

/// The reset names no coding it accepts; an answer that comes compressed anyway (a CDN
/// before QuickBlox) could not be checked for the key, and would reach the client without
/// its `Content-Encoding`: withheld as a 502, where the gateway passes the answer on.
#[tokio::test]
async fn a_compressed_answer_is_withheld() {
    use http_body_util::Full;

    let upstream = upstream_answering(|request| {
        // 418 if the gateway named a coding it accepts.
        let coding = request.headers().contains_key("accept-encoding");
        let mut answer = http::Response::builder()
            .status(if coding { 418 } else { 422 })
            .header("content-type", "application/json");
        if request.uri().query().unwrap_or("").contains("zipped") {
            answer = answer.header("content-encoding", "gzip");
        }
        answer
            .body(Full::new(bytes::Bytes::from_static(
                b"{\"errors\":[\"no\"]}",
            )))
            .unwrap()
    })
    .await;
    let gw = Gateway::start_upstream(&upstream, "").await;
    let plain = gw.reset_as_ios("email=plain%40example.com").await;
    assert_eq!(plain.status, 422, "named no coding: {plain:?}");
    let zipped = gw.reset_as_ios("email=zipped%40example.com").await;
    assert_eq!(zipped.status, 502, "{zipped:?}");
}

/// With the gateway answering CORS, QuickBlox's own CORS headers on a forwarded route are
/// dropped: merged with the gateway's, an allowed origin gained QuickBlox's
/// `Access-Control-Allow-Credentials: true`, and any origin its `*`.
#[tokio::test]
async fn quickblox_cors_headers_do_not_mix_with_the_gateways() {
    use http_body_util::Full;

    let upstream = upstream_answering(|_| {
        http::Response::builder()
            .header("access-control-allow-origin", "*")
            .header("access-control-allow-credentials", "true")
            .body(Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap()
    })
    .await;
    let mock = qb_mock::MockServer::start(mock_config()).await.unwrap();
    let yaml = with_server_keys(
        &yaml(&upstream, "  other_routes: forward\n", ""),
        "  cors:\n    allow_origins: [\"https://app.example\"]\n",
    );
    let gw = Gateway::start_yaml(mock, &yaml).await;
    for origin in ["https://app.example", "https://evil.example"] {
        let reply = gw
            .send("GET", "/users.json", &[("Origin", origin)], "")
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("access-control-allow-credentials"),
            None,
            "{origin}"
        );
        let allowed = reply.header("access-control-allow-origin");
        assert!(
            allowed.is_none() || allowed == Some("https://app.example"),
            "{origin}: {allowed:?}"
        );
        if origin == "https://evil.example" {
            assert_eq!(allowed, None);
        }
    }
}

/// An upstream on a free loopback port that answers every request with `answer`; its URL.
async fn upstream_answering(
    answer: impl Fn(
            http::Request<hyper::body::Incoming>,
        ) -> http::Response<http_body_util::Full<bytes::Bytes>>
        + Clone
        + Send
        + Sync
        + 'static,
) -> String {
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            let service = hyper::service::service_fn(move |request| {
                let response = answer(request);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    url
}
