//! A QuickBlox-compatible upstream for `GET /users/password/reset.json`, for tests, the
//! demo and benchmarks.
//!
//! It answers as QuickBlox does: 200 with an empty body for a registered address, 404
//! `null` for an unknown one, 401 when neither a valid `QB-Token` nor the right
//! `Authorization: ApiKey` is sent, 422 for a missing or malformed address. It can be made
//! slow or broken ([`Failure`]) and records every request it receives.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let mock = qb_mock::MockServer::start(qb_mock::MockConfig {
//!     api_key: "server-key".into(),
//!     users: vec!["alice@example.com".into()],
//!     ..Default::default()
//! })
//! .await?;
//! println!("QuickBlox stand-in on {}", mock.url());
//! # Ok(()) }
//! ```

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// The path QuickBlox serves password resets on.
pub const RESET_PATH: &str = "/users/password/reset.json";

/// How many requests are kept for [`MockServer::requests`]; older ones are dropped so a
/// long benchmark does not grow the process.
const RECORD_LIMIT: usize = 10_000;

/// What the mock knows and how it behaves.
#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    /// The application API key accepted in `Authorization: ApiKey <key>`.
    pub api_key: String,
    /// User session tokens accepted in `QB-Token`.
    pub session_tokens: Vec<String>,
    /// Registered addresses (compared case-insensitively).
    pub users: Vec<String>,
    /// Treat every well-formed address as registered (load benchmarks).
    pub all_users: bool,
    /// Delay before every answer on the reset path.
    pub latency: Duration,
    /// How the reset path misbehaves.
    pub failure: Failure,
}

/// Ways the mock misbehaves on the reset path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Failure {
    /// Answer like QuickBlox.
    #[default]
    None,
    /// Answer every reset with this status and a JSON error body.
    Status(u16),
    /// Never answer.
    Hang,
    /// Send the headers and part of the body, then reset the connection.
    AbortMidBody,
    /// Send the headers and then body chunks forever.
    EndlessBody,
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The method.
    pub method: Method,
    /// The HTTP version it came over.
    pub version: Version,
    /// The path.
    pub path: String,
    /// The raw query string.
    pub query: Option<String>,
    /// Every header as received.
    pub headers: HeaderMap,
}

impl RecordedRequest {
    /// Every query parameter, decoded as Rails decodes them (`+` is a space).
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.query.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect()
    }

    /// The `email` parameter, decoded.
    pub fn email(&self) -> Option<String> {
        self.query_pairs()
            .into_iter()
            .find(|(k, _)| k == "email")
            .map(|(_, v)| v)
    }
}

struct Shared {
    config: Mutex<MockConfig>,
    users: Mutex<HashSet<String>>,
    recorded: Mutex<VecDeque<RecordedRequest>>,
    /// Connections accepted so far.
    accepted: AtomicUsize,
    /// Bumped to close every open connection (the server keeps listening).
    close_all: watch::Sender<u64>,
}

/// A running mock. Dropping it stops the server.
pub struct MockServer {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// A listener on `addr` with a backlog as deep as the gateway's own (4096; Tokio's `bind`
/// leaves 128, as `ss -ltn` shows): a gateway under load opens upstream
/// connections in bursts, and a shallow accept queue would drop their handshakes, each
/// costing its request a second's SYN retransmit that a real upstream would not add.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

impl MockServer {
    /// Starts on a free loopback port.
    pub async fn start(config: MockConfig) -> std::io::Result<MockServer> {
        Self::bind("127.0.0.1:0".parse().expect("valid address"), config, None).await
    }

    /// Starts on `addr`, over TLS when `tls` is given.
    pub async fn bind(
        addr: SocketAddr,
        config: MockConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<MockServer> {
        let listener = listen(addr)?;
        let addr = listener.local_addr()?;
        let users = config.users.iter().map(|u| u.to_lowercase()).collect();
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            users: Mutex::new(users),
            recorded: Mutex::new(VecDeque::new()),
            accepted: AtomicUsize::new(0),
            close_all: watch::channel(0).0,
        });
        let (stop, stopped) = watch::channel(false);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(serve(
            listener,
            shared.clone(),
            tls.map(TlsAcceptor::from),
            stopped,
        ));
        Ok(MockServer {
            addr,
            scheme,
            shared,
            stop,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (or `https://localhost:PORT` over TLS).
    pub fn url(&self) -> String {
        match self.scheme {
            "https" => format!("https://localhost:{}", self.addr.port()),
            _ => format!("http://{}", self.addr),
        }
    }

    /// The requests received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.recorded).iter().cloned().collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.recorded).clear();
    }

    /// Changes how the reset path misbehaves.
    pub fn set_failure(&self, failure: Failure) {
        lock(&self.shared.config).failure = failure;
    }

    /// Changes the API key it accepts (key rotation).
    pub fn set_api_key(&self, key: &str) {
        lock(&self.shared.config).api_key = key.to_owned();
    }

    /// Changes the delay before every answer.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.shared.config).latency = latency;
    }

    /// Registers another address.
    pub fn add_user(&self, email: &str) {
        lock(&self.shared.users).insert(email.to_lowercase());
    }

    /// Connections accepted so far (keep-alive clients reuse theirs).
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Closes every open connection and keeps listening, as a load balancer does with
    /// idle keep-alive connections.
    pub fn close_connections(&self) {
        self.shared
            .close_all
            .send_modify(|generation| *generation += 1);
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread must not poison the mock for the next request.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
            _ = stopped.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let mut closed = shared.close_all.subscribe();
        let shared = shared.clone();
        let tls = tls.clone();
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let service =
                hyper::service::service_fn(move |request| handle(shared.clone(), request));
            let builder = auto::Builder::new(TokioExecutor::new());
            let result = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => {
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        tokio::select! {
                            r = conn => r,
                            _ = stopped.changed() => Ok(()),
                            _ = closed.changed() => Ok(()),
                        }
                    }
                    Err(_) => Ok(()),
                },
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        r = conn => r,
                        _ = stopped.changed() => Ok(()),
                        _ = closed.changed() => Ok(()),
                    }
                }
            };
            drop(result);
        });
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
}

type MockBody = BoxBody<Bytes, std::io::Error>;

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let recorded = RecordedRequest {
        method: request.method().clone(),
        version: request.version(),
        path: request.uri().path().to_owned(),
        query: request.uri().query().map(str::to_owned),
        headers: request.headers().clone(),
    };
    {
        let mut log = lock(&shared.recorded);
        if log.len() == RECORD_LIMIT {
            log.pop_front();
        }
        log.push_back(recorded.clone());
    }
    if recorded.path != RESET_PATH {
        return Ok(json(StatusCode::NOT_FOUND, r#"{"errors":["Not found"]}"#));
    }
    let config = lock(&shared.config).clone();
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    match config.failure {
        Failure::None => {}
        Failure::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = json(status, r#"{"errors":["Service temporarily unavailable"]}"#);
            if status == StatusCode::TOO_MANY_REQUESTS {
                // QuickBlox's own rate limit says when to come back.
                response
                    .headers_mut()
                    .insert("retry-after", "30".parse().expect("valid"));
            }
            return Ok(response);
        }
        Failure::Hang => std::future::pending::<()>().await,
        Failure::AbortMidBody => return Ok(abort_mid_body()),
        Failure::EndlessBody => return Ok(endless_body()),
    }
    Ok(reset(&shared, &config, &recorded))
}

/// QuickBlox's answer to a password-reset request.
fn reset(shared: &Shared, config: &MockConfig, request: &RecordedRequest) -> Response<MockBody> {
    if request.method != Method::GET {
        return json(StatusCode::NOT_FOUND, r#"{"errors":["Not found"]}"#);
    }
    let qb_token = request.headers.get("qb-token");
    let authorization = request.headers.get("authorization");
    let authorised = match (qb_token, authorization) {
        (None, None) => {
            return json(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":["Token is required"]}"#,
            )
        }
        (Some(_), Some(_)) => false,
        (Some(token), None) => config
            .session_tokens
            .iter()
            .any(|t| t.as_bytes() == token.as_bytes()),
        (None, Some(value)) => value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .is_some_and(|(scheme, key)| {
                scheme.eq_ignore_ascii_case("apikey")
                    && !config.api_key.is_empty()
                    && key == config.api_key
            }),
    };
    if !authorised {
        return json(
            StatusCode::UNAUTHORIZED,
            r#"{"errors":["Required session does not exist"]}"#,
        );
    }
    let email = match request.email() {
        Some(email) if !email.is_empty() => email,
        _ => {
            return json(
                StatusCode::UNPROCESSABLE_ENTITY,
                r#"{"errors":{"email":["can't be blank"]}}"#,
            )
        }
    };
    if !email.contains('@') {
        return json(
            StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"errors":{"email":["is invalid"]}}"#,
        );
    }
    if config.all_users || lock(&shared.users).contains(&email.to_lowercase()) {
        let mut response = Response::new(full(Bytes::new()));
        response.headers_mut().insert(
            "content-type",
            "application/json; charset=utf-8".parse().expect("valid"),
        );
        response
    } else {
        json(StatusCode::NOT_FOUND, "null")
    }
}

fn full(bytes: Bytes) -> MockBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn json(status: StatusCode, body: &'static str) -> Response<MockBody> {
    let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        "application/json; charset=utf-8".parse().expect("valid"),
    );
    response
}

fn abort_mid_body() -> Response<MockBody> {
    let chunks = stream::iter([
        Ok(Frame::data(Bytes::from_static(b"{\"errors\":"))),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "aborted by qb-mock",
        )),
    ]);
    let mut response = Response::new(StreamBody::new(chunks).boxed());
    response
        .headers_mut()
        .insert("content-length", "100".parse().expect("valid"));
    response
}

fn endless_body() -> Response<MockBody> {
    let chunks = stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Some((Ok(Frame::data(Bytes::from_static(b" "))), ()))
    });
    Response::new(StreamBody::new(chunks).boxed())
}
