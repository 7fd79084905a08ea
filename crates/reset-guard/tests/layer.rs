//! The layer driven as an embedding service would, through its public API only:
//! `ServiceBuilder` around a `service_fn`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tower::{service_fn, BoxError, ServiceBuilder, ServiceExt};

use reset_guard::*;

/// SHA-256 of "foo".
const FOO_SHA256: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

fn settings(extra: &str) -> GuardSettings {
    let yaml = format!("clients:\n  - id: app\n    token_sha256: {FOO_SHA256}\n{extra}");
    GuardConfig::from_yaml(&yaml).unwrap().validate().unwrap()
}

type Seen = Arc<Mutex<Vec<(HeaderMap, Option<String>)>>>;

/// The peer every request in these tests comes from, unless it says otherwise.
fn peer() -> PeerAddr {
    PeerAddr(SocketAddr::from(([192, 0, 2, 1], 40000)))
}

/// Runs one request (from [`peer`] when it names none) through the guard in front of an
/// upstream that answers `status`.
async fn run(
    extra: &str,
    status: StatusCode,
    mut request: Request<Full<Bytes>>,
) -> (Response<GuardBody<Full<Bytes>>>, Seen) {
    if request.extensions().get::<PeerAddr>().is_none() {
        request.extensions_mut().insert(peer());
    }
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let upstream = service_fn(move |request: Request<Full<Bytes>>| {
        let email = request
            .extensions()
            .get::<GuardedRequest>()
            .map(|g| g.email().to_owned());
        log.lock().unwrap().push((request.headers().clone(), email));
        async move {
            let mut response = Response::new(Full::new(Bytes::from_static(b"null")));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert("x-upstream", "yes".parse().unwrap());
            Ok::<_, Infallible>(response)
        }
    });
    let layer = ResetGuardLayer::new(settings(extra), ApiKey::new("server-key").unwrap());
    let service = ServiceBuilder::new().layer(layer).service(upstream);
    (service.oneshot(request).await.unwrap(), seen)
}

fn reset(query: &str) -> http::request::Builder {
    Request::get(format!("/users/password/reset.json?{query}"))
}

async fn body_of<B>(response: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(Into::into)
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn rejected(request: Request<Full<Bytes>>) -> (StatusCode, String) {
    let (response, seen) = run("", StatusCode::OK, request).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "a rejected request reached upstream"
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    (response.status(), body_of(response).await)
}

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// Over HTTP/1 Content-Length and Transfer-Encoding say a request has a body, or the body
/// knowing it holds bytes: one whose body type cannot tell its size (tower-http's
/// `RequestBodyTimeout` around it, or a stream) is served. Over HTTP/2, where a body needs
/// no header, a stream with data is refused.
#[tokio::test]
async fn over_http1_only_the_headers_say_a_get_has_a_body() {
    async fn answer<B>(_: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(Response::new(Full::new(Bytes::new())))
    }
    let layer = ResetGuardLayer::new(settings(""), ApiKey::new("server-key").unwrap());
    let wrapped = ServiceBuilder::new()
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            Duration::from_secs(5),
        ))
        .layer(layer.clone())
        .service(service_fn(answer));
    let request = reset("email=a@b.io")
        .header("qb-token", "foo")
        .extension(peer())
        .body(empty())
        .unwrap();
    assert_eq!(wrapped.oneshot(request).await.unwrap().status(), 200);

    let streamed = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(answer));
    let stream = |data: &'static [u8]| {
        let frames = [Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(
            data,
        )))];
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    };
    let request = |version, data| {
        reset("email=b@c.io")
            .version(version)
            .header("qb-token", "foo")
            .extension(peer())
            .body(stream(data))
            .unwrap()
    };
    let status = |response: Response<_>| response.status();
    // A body known to hold bytes is one, headers or not.
    let sized = reset("email=c@d.io")
        .header("qb-token", "foo")
        .extension(peer())
        .body(Full::new(Bytes::from_static(b"email=victim%40x.io")))
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(ResetGuardLayer::new(
            settings(""),
            ApiKey::new("server-key").unwrap(),
        ))
        .service(service_fn(answer));
    let refused = service.oneshot(sized).await.map(status).unwrap();
    assert_eq!(refused, StatusCode::BAD_REQUEST);
    let service = streamed.clone();
    let http1 = service.oneshot(request(http::Version::HTTP_11, b"")).await;
    assert_eq!(http1.map(status).unwrap(), StatusCode::OK);
    let http2 = streamed
        .oneshot(request(http::Version::HTTP_2, b"hi"))
        .await;
    assert_eq!(http2.map(status).unwrap(), StatusCode::BAD_REQUEST);
}

/// Over HTTP/2 a `Content-Length: 0` says there is no body (the HTTP/2 server holds the
/// stream to it), whatever a wrapper outside the guard hides of the body's end: with
/// tower-http's `RequestBodyTimeout` around it, every HTTP/2 reset was a 400.
#[tokio::test]
async fn over_http2_a_declared_empty_body_is_none_behind_a_wrapper() {
    async fn answer<B>(_: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(Response::new(Full::new(Bytes::new())))
    }
    let wrapped = ServiceBuilder::new()
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            Duration::from_secs(5),
        ))
        .layer(ResetGuardLayer::new(
            settings(""),
            ApiKey::new("server-key").unwrap(),
        ))
        .service(service_fn(answer));
    // A stream that has not ended, as an HTTP/2 request's body before its end is read.
    let unended = || {
        http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<Bytes>, Infallible>,
        >())
    };
    let request = |content_length: Option<&str>| {
        let mut request = reset("email=a@b.io")
            .version(http::Version::HTTP_2)
            .header("qb-token", "foo")
            .extension(peer());
        if let Some(length) = content_length {
            request = request.header("content-length", length);
        }
        request.body(unended()).unwrap()
    };
    let status = |request| async { wrapped.clone().oneshot(request).await.unwrap().status() };
    assert_eq!(status(request(Some("0"))).await, StatusCode::OK);
    assert_eq!(status(request(Some("2"))).await, StatusCode::BAD_REQUEST);
    // Without the header, the stream's end is what tells: hidden by the wrapper, the
    // request is taken to have a body (the README says such wrappers go inside the guard).
    assert_eq!(status(request(None)).await, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn every_rejection_row_of_the_table() {
    let cases: Vec<(Request<Full<Bytes>>, StatusCode, &str)> = vec![
        (
            Request::get("/users.json").body(empty()).unwrap(),
            StatusCode::NOT_FOUND,
            r#"{"errors":{"base":["Not found"]}}"#,
        ),
        (
            Request::post("/users/password/reset.json")
                .body(empty())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"errors":{"base":["Method not allowed"]}}"#,
        ),
        (
            reset("email=a@b.io")
                .header("qb-token", "foo")
                .header("content-length", "2")
                .body(Full::new(Bytes::from_static(b"hi")))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            r#"{"errors":{"base":["GET request must not have a body"]}}"#,
        ),
        (
            reset("email=a@b.io")
                .header("qb-token", "foo")
                .header("transfer-encoding", "chunked")
                .body(empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            r#"{"errors":{"base":["GET request must not have a body"]}}"#,
        ),
        (
            reset("email=a@b.io")
                .header("qb-token", "foo")
                .header("authorization", "ApiKey foo")
                .body(empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            r#"{"errors":{"base":["Send exactly one of QB-Token and Authorization"]}}"#,
        ),
        (
            reset("email=a@b.io")
                .header("qb-token", "foo")
                .header("qb-token", "foo")
                .body(empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            r#"{"errors":{"base":["QB-Token header given more than once"]}}"#,
        ),
        (
            reset("email=a@b.io&email=c@d.io")
                .header("qb-token", "foo")
                .body(empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            r#"{"errors":{"base":["email parameter given more than once"]}}"#,
        ),
        (
            reset("email=a@b.io").body(empty()).unwrap(),
            StatusCode::UNAUTHORIZED,
            r#"{"errors":{"base":["QB-Token or Authorization header is required"]}}"#,
        ),
        (
            reset("email=a@b.io")
                .header("authorization", "Bearer foo")
                .body(empty())
                .unwrap(),
            StatusCode::UNAUTHORIZED,
            r#"{"errors":{"base":["Authorization scheme must be ApiKey"]}}"#,
        ),
        (
            reset("email=a@b.io")
                .header("qb-token", "bar")
                .body(empty())
                .unwrap(),
            StatusCode::UNAUTHORIZED,
            r#"{"errors":{"base":["Unknown client token"]}}"#,
        ),
        (
            reset("x=1")
                .header("qb-token", "foo")
                .body(empty())
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"errors":{"email":["is required"]}}"#,
        ),
        (
            reset("email=a@b")
                .header("qb-token", "foo")
                .body(empty())
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"errors":{"email":["is invalid"]}}"#,
        ),
        (
            reset("email=%C3%28@b.io")
                .header("qb-token", "foo")
                .body(empty())
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"errors":{"email":["is invalid"]}}"#,
        ),
    ];
    for (request, status, body) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        assert_eq!(rejected(request).await, (status, body.to_owned()), "{what}");
    }
}

#[tokio::test]
async fn method_not_allowed_says_allow_get() {
    let request = Request::delete("/users/password/reset.json")
        .body(empty())
        .unwrap();
    let (response, _) = run("", StatusCode::OK, request).await;
    assert_eq!(response.headers()["allow"], "GET");
}

#[tokio::test]
async fn checks_run_in_order_auth_before_email() {
    // No credential and no email: the credential is reported, the email never parsed.
    let request = reset("email=bad").body(empty()).unwrap();
    assert_eq!(rejected(request).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn swaps_the_client_token_for_the_server_key() {
    for header in ["qb-token", "authorization"] {
        let value = if header == "qb-token" {
            "foo"
        } else {
            "apikey foo"
        };
        let request = reset("email=Bob%2Bx%40Example.com&other=1")
            .header(header, value)
            .header("cookie", "session=1")
            .body(empty())
            .unwrap();
        let (response, seen) = run("", StatusCode::OK, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let seen = seen.lock().unwrap();
        let (headers, email) = &seen[0];
        assert_eq!(headers["authorization"], "ApiKey server-key");
        assert!(headers["authorization"].is_sensitive());
        assert!(headers.get("qb-token").is_none());
        assert_eq!(email.as_deref(), Some("Bob+x@Example.com"));
    }
}

#[tokio::test]
async fn uniform_hides_whether_the_account_exists() {
    let mut answers = Vec::new();
    for status in [
        StatusCode::OK,
        StatusCode::NOT_FOUND,
        StatusCode::UNAUTHORIZED,
    ] {
        let request = reset("email=a@b.io")
            .header("qb-token", "foo")
            .body(empty())
            .unwrap();
        let (response, _) = run("", status, request).await;
        let true_status = response.extensions().get::<UpstreamStatus>().copied();
        assert_eq!(true_status, Some(UpstreamStatus(status)));
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        answers.push((parts.status, format!("{:?}", parts.headers), body));
    }
    assert_eq!(answers[0].0, StatusCode::OK);
    assert!(answers[0].2.is_empty());
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0], answers[2]);
}

#[tokio::test]
async fn uniform_off_passes_status_and_body_through() {
    let request = reset("email=a@b.io")
        .header("qb-token", "foo")
        .body(empty())
        .unwrap();
    let (response, _) = run(
        "responses: { uniform: false }\n",
        StatusCode::NOT_FOUND,
        request,
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.headers()["x-upstream"], "yes");
    assert_eq!(body_of(response).await, "null");
}

#[tokio::test]
async fn uniform_leaves_other_statuses_alone() {
    let request = reset("email=a@b.io")
        .header("qb-token", "foo")
        .body(empty())
        .unwrap();
    let (response, _) = run("", StatusCode::UNPROCESSABLE_ENTITY, request).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(start_paused = true)]
async fn min_latency_pads_answers_past_the_email_check() {
    let extra = "responses: { min_latency: 300ms }\n";
    let started = tokio::time::Instant::now();
    let request = reset("email=a@b.io")
        .header("qb-token", "foo")
        .body(empty())
        .unwrap();
    let (response, _) = run(extra, StatusCode::NOT_FOUND, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(started.elapsed(), Duration::from_millis(300));

    // An invalid address is answered at once: it never passed step 4.
    let started = tokio::time::Instant::now();
    let request = reset("email=nope")
        .header("qb-token", "foo")
        .body(empty())
        .unwrap();
    let (response, _) = run(extra, StatusCode::OK, request).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn forward_mode_passes_other_paths_untouched() {
    let extra = "other_routes: forward\n";
    let request = Request::get("/session.json")
        .header("qb-token", "user-session")
        .body(empty())
        .unwrap();
    let (response, seen) = run(extra, StatusCode::OK, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-upstream"], "yes");
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].0["qb-token"], "user-session");
    assert!(seen[0].1.is_none());
}

#[tokio::test]
async fn requests_the_guard_does_not_charge_carry_the_client_behind_trusted_proxies() {
    let extra = "other_routes: forward\nclient_ip: { trusted_proxies: [192.0.2.0/24] }\n";
    let from_proxy = |method: &str, path: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("x-forwarded-for", "6.6.6.6, 198.51.100.9")
            .extension(peer())
            .body(empty())
            .unwrap()
    };
    let client = ClientIp::resolve("198.51.100.9".parse().unwrap(), &HeaderMap::new(), &[]);
    // Passed on to the inner service, which finds the client in the request.
    let found: Arc<Mutex<Option<ClientIp>>> = Arc::default();
    let record = found.clone();
    let inner = service_fn(move |request: Request<Full<Bytes>>| {
        *record.lock().unwrap() = request.extensions().get::<ClientIp>().copied();
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
    });
    let layer = ResetGuardLayer::new(settings(extra), ApiKey::new("server-key").unwrap());
    let service = ServiceBuilder::new().layer(layer).service(inner);
    let passed = service.clone().oneshot(from_proxy("GET", "/users.json"));
    assert_eq!(passed.await.unwrap().status(), StatusCode::OK);
    assert_eq!(*found.lock().unwrap(), Some(client));
    // Answered by the guard before its limits: the client is in the answer.
    for (method, path, status) in [
        ("GET", "//users/password/reset.json", StatusCode::NOT_FOUND),
        (
            "POST",
            "/users/password/reset.json",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ] {
        let answer = service
            .clone()
            .oneshot(from_proxy(method, path))
            .await
            .unwrap();
        assert_eq!(answer.status(), status);
        assert_eq!(
            answer.extensions().get::<ClientIp>(),
            Some(&client),
            "{path}"
        );
    }
}

#[tokio::test]
async fn forward_mode_never_forwards_lookalikes_of_the_guarded_path() {
    let extra = "other_routes: forward\n";
    for path in [
        "/users/password/reset%2Ejson?email=a@b.io",
        "//users/password/reset.json",
        "/users/password/reset",
    ] {
        let request = Request::get(path).body(empty()).unwrap();
        let (response, seen) = run(extra, StatusCode::OK, request).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(seen.lock().unwrap().is_empty());
    }
}

#[tokio::test]
async fn handle_swaps_settings_live() {
    let layer = ResetGuardLayer::new(settings(""), ApiKey::new("k1").unwrap());
    let handle = layer.handle();
    let upstream = service_fn(|request: Request<Empty<Bytes>>| async move {
        let key = request.headers()["authorization"]
            .to_str()
            .unwrap()
            .to_owned();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(key))))
    });
    let service = ServiceBuilder::new().layer(layer).service(upstream);
    let ask = || {
        reset("email=a@b.io")
            .header("qb-token", "foo")
            .extension(peer())
            .body(Empty::new())
            .unwrap()
    };
    let uniform_off = settings("responses: { uniform: false }\n");

    handle.update(uniform_off.clone(), ApiKey::new("k2").unwrap());
    let response = service.clone().oneshot(ask()).await.unwrap();
    assert_eq!(body_of(response).await, "ApiKey k2");

    // New settings alone keep the key the guard has.
    handle.update_settings(settings(
        "responses: { uniform: false }\nlimits: { per_ip: [] }\n",
    ));
    let response = service.clone().oneshot(ask()).await.unwrap();
    assert_eq!(body_of(response).await, "ApiKey k2");

    let other_client = GuardConfig::from_yaml(&format!(
        "clients: [{{ id: b, token_sha256: {} }}]",
        "0".repeat(64)
    ))
    .unwrap()
    .validate()
    .unwrap();
    handle.update(other_client, ApiKey::new("k2").unwrap());
    let response = service.oneshot(ask()).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

/// The messages of the error events logged while it is the default subscriber.
#[derive(Clone, Default)]
struct ErrorLog(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for ErrorLog {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() == tracing::Level::ERROR
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut text = String::new();
        event.record(
            &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                text.push_str(&format!("{}={value:?} ", field.name()));
            },
        );
        self.0.lock().unwrap().push(text);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A guard over an app that counts its calls.
type Counted = (
    tower::util::BoxCloneService<
        Request<Empty<Bytes>>,
        Response<GuardBody<Full<Bytes>>>,
        Infallible,
    >,
    Arc<Mutex<usize>>,
);

/// `builder`'s guard in front of an app that answers "app" and counts its calls.
fn counted(builder: ResetGuardBuilder) -> Counted {
    let calls = Arc::new(Mutex::new(0));
    let count = calls.clone();
    let upstream = service_fn(move |_: Request<Empty<Bytes>>| {
        *count.lock().unwrap() += 1;
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"app")))) }
    });
    let service = ServiceBuilder::new()
        .layer(builder.build().unwrap().0)
        .service(upstream);
    (tower::util::BoxCloneService::new(service), calls)
}

#[tokio::test]
async fn a_reset_without_a_peer_address_is_refused_and_logged_once() {
    let errors = ErrorLog::default();
    let _logging = tracing::subscriber::set_default(errors.clone());
    let builder = ResetGuardLayer::builder(
        settings("other_routes: forward\n"),
        ApiKey::new("server-key").unwrap(),
    );
    let (service, calls) = counted(builder);
    for email in ["bob@example.com", "ann@example.com"] {
        let request = reset(&format!("email={email}"))
            .header("qb-token", "foo")
            .body(Empty::new())
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        // Tagged as the guard's, so the host's logs tell it from a handler's 500.
        assert_eq!(
            response.extensions().get::<Rejection>(),
            Some(&Rejection::MissingPeerAddress)
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/json; charset=utf-8"
        );
        assert_eq!(
            body_of(response).await,
            r#"{"errors":{"base":["Internal server error"]}}"#
        );
    }
    assert_eq!(*calls.lock().unwrap(), 0, "a refused reset reached the app");

    // Said once, with the way out, and without the request's address.
    let logged = errors.0.lock().unwrap().clone();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(logged[0].contains("PeerAddr"), "{}", logged[0]);
    assert!(logged[0].contains("without_peer_address"), "{}", logged[0]);
    assert!(!logged[0].contains("example.com"), "{}", logged[0]);

    // The app's other routes do not need the peer address.
    let request = Request::get("/health").body(Empty::new()).unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_of(response).await, "app");
}

#[tokio::test]
async fn without_peer_address_puts_addressless_requests_in_one_per_ip_bucket() {
    let extra = "limits:\n  per_ip: [{ requests: 2, per: 1m }]\n";
    let builder = ResetGuardLayer::builder(settings(extra), ApiKey::new("server-key").unwrap())
        .without_peer_address();
    let (service, _) = counted(builder);
    let ask = |email: &str, peer: Option<PeerAddr>| {
        let mut request = reset(&format!("email={email}"))
            .header("qb-token", "foo")
            .body(Empty::new())
            .unwrap();
        if let Some(peer) = peer {
            request.extensions_mut().insert(peer);
        }
        service.clone().oneshot(request)
    };
    let mut statuses = Vec::new();
    for email in ["a@x.io", "b@x.io", "c@x.io"] {
        statuses.push(ask(email, None).await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    // A request that does carry its peer has that peer's own bucket.
    let response = ask("d@x.io", Some(peer())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}
