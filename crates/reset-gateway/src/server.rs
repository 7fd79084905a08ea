//! The public listener: accepts connections (TLS optional, bounded in number), serves
//! HTTP/1.1 and HTTP/2 through CORS, the guard and the forwarder, and drains on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use reset_guard::{
    GuardBody, GuardHandle, GuardedRequest, PeerAddr, Rejection, ResetGuard, ResetGuardLayer,
    UpstreamStatus,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::util::Either;
use tower::ServiceExt;
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};

use crate::admin::{self, Status};
use crate::config::Settings;
use crate::header_names::{QB_TOKEN, RATELIMIT, RATELIMIT_POLICY};
use crate::metrics::Metrics;
use crate::preface;
use crate::refusal::Refusal;
use crate::reload::Reloader;
use crate::request_id::{self, X_REQUEST_ID};
use crate::telemetry::AccessRecord;
use crate::tls::CertStore;
use crate::upstream::{ForwardBody, Forwarder, UpstreamExchange};

/// The body of every answer the gateway sends.
pub type GatewayBody = GuardBody<ForwardBody>;

type Stack = Either<Cors<ResetGuard<Forwarder>>, ResetGuard<Forwarder>>;

/// A gateway bound to its listeners, ready to [`run`](App::run).
pub struct App {
    /// One listener per worker: duplicates of one socket.
    listeners: Vec<std::net::TcpListener>,
    addr: SocketAddr,
    admin: TcpListener,
    /// One service stack per worker; each has its own upstream pool.
    workers: Vec<Arc<Shared>>,
    status: Arc<Status>,
    forwarders: Vec<Forwarder>,
    certs: Option<Arc<CertStore>>,
    tls: Option<TlsAcceptor>,
    settings: Settings,
}

/// What every connection of one worker reads.
struct Shared {
    service: Stack,
    include_email: bool,
    request_timeout: Duration,
    max_uri_bytes: usize,
    status: Arc<Status>,
}

/// Binds the listeners and builds the service stacks; no request is served until `run`.
pub async fn build(settings: Settings) -> anyhow::Result<App> {
    let server = &settings.server;
    let listeners = bind_listeners(server.listen, server.workers)
        .with_context(|| format!("server.listen: cannot listen on {}", server.listen))?;
    let addr = listeners[0].local_addr()?;
    let admin = admin::bind(server.admin_listen).await?;
    let mut layer = ResetGuardLayer::builder(settings.guard.clone(), settings.api_key.clone())
        .store(settings.store.limits.clone());
    if let Some(secret) = &settings.store.key_secret {
        layer = layer.key_secret(secret);
    }
    // One guard for all workers: the limits are the process's, not a worker's. Its
    // housekeeping (idle-key sweeps, the Redis probe) runs on the caller's runtime.
    let (layer, housekeeping) = layer.build().context("store.redis.url")?;
    tokio::spawn(housekeeping);
    let guard = layer.handle();
    let status = Arc::new(Status {
        draining: Default::default(),
        metrics: Metrics::new(guard.clone()),
        guard,
    });
    let (certs, tls) = match &server.tls {
        Some(files) => {
            let certs = CertStore::load(files)?;
            let acceptor = certs.acceptor()?;
            (Some(certs), Some(acceptor))
        }
        None => (None, None),
    };
    let mut forwarders = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..listeners.len() {
        let forwarder = Forwarder::new(settings.upstream.clone())?;
        let service = tower::ServiceBuilder::new()
            // CORS first: a browser's preflight is answered here, before any check.
            .option_layer(cors(&settings))
            // The guard sits in front of the forwarder: nothing it rejects costs an upstream call.
            .layer(layer.clone())
            .service(forwarder.clone());
        forwarders.push(forwarder);
        workers.push(Arc::new(Shared {
            service,
            include_email: settings.log.include_email,
            request_timeout: server.request_timeout,
            max_uri_bytes: server.max_uri_bytes,
            status: status.clone(),
        }));
    }
    Ok(App {
        listeners,
        addr,
        admin,
        workers,
        status,
        forwarders,
        certs,
        tls,
        settings,
    })
}

/// One listening socket on `addr`, and a duplicate of it for every further worker. Every
/// worker waits on the same accept queue, so whichever is least busy takes the next
/// connection (as nginx's workers do without `reuseport`), rather than the kernel hashing
/// connections onto workers regardless of their load.
fn bind_listeners(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    let first: std::net::TcpListener = socket.into();
    let mut listeners = Vec::with_capacity(count.max(1));
    for _ in 1..count.max(1) {
        listeners.push(first.try_clone()?);
    }
    listeners.insert(0, first);
    Ok(listeners)
}

/// CORS for browser apps, when origins are configured.
fn cors(settings: &Settings) -> Option<CorsLayer> {
    let origins = &settings.server.cors_origins;
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins.iter().cloned()))
            .allow_methods([Method::GET])
            .allow_headers([
                QB_TOKEN,
                AUTHORIZATION,
                CONTENT_TYPE,
                X_REQUEST_ID,
                HeaderName::from_static("qb-sdk"),
                HeaderName::from_static("qb-os"),
            ])
            .expose_headers([RETRY_AFTER, RATELIMIT, RATELIMIT_POLICY, X_REQUEST_ID])
            .max_age(settings.server.cors_max_age),
    )
}

impl App {
    /// The address the public listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the admin listener is bound to.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Swaps guard settings live.
    pub fn guard_handle(&self) -> GuardHandle {
        self.status.guard.clone()
    }

    /// What reloads the configuration from `path` into this running gateway.
    pub fn reloader(&self, path: std::path::PathBuf) -> Reloader {
        Reloader::new(
            path,
            self.status.clone(),
            self.forwarders.clone(),
            self.certs.clone(),
            &self.settings,
        )
    }

    /// Serves until `shutdown` completes, then reports not ready, stops accepting and lets
    /// in-flight requests finish for up to `server.shutdown_grace`.
    ///
    /// Each worker runs on its own thread with its own single-threaded event loop, like
    /// nginx's worker processes: a connection, its requests and its upstream exchanges stay
    /// on one thread, with no work stealing or cross-thread wake-ups between them. The
    /// admin listener, reloads and limiter housekeeping stay on the caller's runtime.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let server = self.settings.server.clone();
        tokio::spawn(admin::serve(self.admin, self.status.clone()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let per_worker = server.max_connections.div_ceil(self.workers.len()).max(1);
        let mut finished = Vec::new();
        for (index, (listener, shared)) in self.listeners.into_iter().zip(self.workers).enumerate()
        {
            let worker = Worker {
                listener,
                shared,
                protocols: Protocols::new(&server),
                tls: self.tls.clone(),
                head_timeout: server.header_read_timeout,
                grace: server.shutdown_grace,
                max_connections: per_worker,
                stop: stopped.clone(),
            };
            let (done, finish) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name(format!("gateway-worker-{index}"))
                .spawn(move || {
                    let result = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(anyhow::Error::from)
                        .and_then(|runtime| runtime.block_on(worker.run()));
                    let _ = done.send(result);
                })
                .context("starting a worker thread")?;
            finished.push(finish);
        }
        shutdown.await;
        self.status.draining.store(true, Ordering::Relaxed);
        tracing::info!(
            grace_secs = server.shutdown_grace.as_secs(),
            "draining connections"
        );
        let _ = stop.send(true);
        for finish in finished {
            finish.await.context("a worker thread died")??;
        }
        Ok(())
    }
}

/// One worker: its listener, its event loop, its connections.
struct Worker {
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    protocols: Protocols,
    tls: Option<TlsAcceptor>,
    head_timeout: Duration,
    grace: Duration,
    max_connections: usize,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Worker {
    async fn run(mut self) -> anyhow::Result<()> {
        let listener = TcpListener::from_std(self.listener)?;
        let connections = Arc::new(Semaphore::new(self.max_connections));
        let graceful = GracefulShutdown::new();
        let stop = async {
            let _ = self.stop.wait_for(|stop| *stop).await;
        };
        let mut stop = std::pin::pin!(stop);
        loop {
            // Beyond max_connections, new connections wait in the kernel's backlog rather
            // than being accepted and starving the ones being served.
            let permit = tokio::select! {
                permit = connections.clone().acquire_owned() => permit.expect("never closed"),
                () = &mut stop => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = accept(&listener) => accepted,
                () = &mut stop => break,
            };
            let _ = stream.set_nodelay(true);
            let connection = Connection {
                protocols: self.protocols.clone(),
                service: GatewayService {
                    shared: self.shared.clone(),
                    peer,
                },
                head_timeout: self.head_timeout,
                watcher: graceful.watcher(),
            };
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tls {
                    Some(acceptor) => connection.serve_tls(acceptor, stream).await,
                    None => connection.serve_plain(stream).await,
                }
            });
        }
        drop(listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(self.grace) => tracing::warn!("shutdown grace elapsed with requests in flight"),
        }
        Ok(())
    }
}

/// The next connection on `listener`. A failed accept (out of file descriptors and the
/// like) is logged and retried after a pause, instead of spinning on it.
pub(crate) async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(pair) => return pair,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The HTTP/1.1 and HTTP/2 server settings.
#[derive(Clone)]
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(server: &crate::config::ServerSettings) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // Also closes keep-alive connections idle for that long between requests.
            .header_read_timeout(server.header_read_timeout)
            .max_buf_size(server.max_header_bytes)
            // A client that shuts down its sending side after the request still gets the answer.
            .half_close(true)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20));
        Protocols { http1, http2 }
    }
}

/// One accepted connection, before its protocol is known.
struct Connection {
    protocols: Protocols,
    service: GatewayService,
    head_timeout: Duration,
    watcher: Watcher,
}

impl Connection {
    /// Cleartext: HTTP/2 if the client opens with the preface, else HTTP/1.1. A client
    /// that sends nothing, or part of the preface, is dropped after the header read
    /// timeout, so such connections cannot hold `max_connections` slots; waiting on them
    /// costs nothing but their memory.
    async fn serve_plain(self, stream: TcpStream) {
        let peer = self.service.peer;
        match tokio::time::timeout(self.head_timeout, preface::read_protocol(stream)).await {
            Ok(Ok((preface::Protocol::Http2, io))) => self.serve_h2(io).await,
            Ok(Ok((preface::Protocol::Http1, io))) => self.serve_h1(io).await,
            Ok(Err(error)) => tracing::debug!(%peer, %error, "connection failed before a request"),
            Err(_) => tracing::debug!(%peer, "no request within the header read timeout"),
        }
    }

    /// TLS: the handshake must finish within the header read timeout; ALPN picks the protocol.
    async fn serve_tls(self, acceptor: TlsAcceptor, stream: TcpStream) {
        let peer = self.service.peer;
        match tokio::time::timeout(self.head_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    self.serve_h2(tls).await
                } else {
                    self.serve_h1(tls).await
                }
            }
            Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    }

    async fn serve_h1<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self, io: I) {
        let peer = self.service.peer;
        let connection = self
            .protocols
            .http1
            .serve_connection(TokioIo::new(io), self.service);
        if let Err(error) = self.watcher.watch(connection).await {
            tracing::debug!(%peer, %error, "HTTP/1.1 connection ended with an error");
        }
    }

    async fn serve_h2<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self, io: I) {
        let peer = self.service.peer;
        let connection = self
            .protocols
            .http2
            .serve_connection(TokioIo::new(io), self.service);
        if let Err(error) = self.watcher.watch(connection).await {
            tracing::debug!(%peer, %error, "HTTP/2 connection ended with an error");
        }
    }
}

/// Requests a careful HTTP server refuses before looking at what they ask: an HTTP/1.1
/// request without exactly one Host (RFC 9112 §3.2), or a target longer than `max_uri`.
fn malformed<B>(request: &Request<B>, max_uri: usize) -> Option<Refusal> {
    let uri_len = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if uri_len > max_uri {
        return Some(Refusal::TargetTooLong);
    }
    if request.version() == http::Version::HTTP_11 && request.uri().authority().is_none() {
        let mut hosts = request.headers().get_all(http::header::HOST).iter();
        if hosts.next().is_none() || hosts.next().is_some() {
            return Some(Refusal::HostRequired);
        }
    }
    None
}

/// One connection's view of the gateway.
#[derive(Clone)]
struct GatewayService {
    shared: Arc<Shared>,
    peer: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for GatewayService {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        Box::pin(handle(self.shared.clone(), self.peer, request))
    }
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<GatewayBody>, Infallible> {
    let started = Instant::now();
    let id = request_id::resolve(request.headers());
    if let Some(refusal) = malformed(&request, shared.max_uri_bytes) {
        let mut response = refusal.to_response().map(GuardBody::full);
        response.headers_mut().insert(X_REQUEST_ID, id);
        shared
            .status
            .metrics
            .request(refusal.outcome(), started.elapsed());
        return Ok(response);
    }
    request.headers_mut().insert(X_REQUEST_ID, id.clone());
    request.extensions_mut().insert(PeerAddr(peer));
    let mut answer = std::pin::pin!(shared.service.clone().oneshot(request));
    // Most answers (every rejection) are ready at once: only arm the request timer for the
    // ones that wait on QuickBlox or Redis.
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(answer.as_mut().poll(cx))).await;
    let outcome = match first {
        std::task::Poll::Ready(result) => Ok(result),
        std::task::Poll::Pending => tokio::time::timeout(shared.request_timeout, answer).await,
    };
    let mut response = match outcome {
        Ok(Ok(response)) => response,
        Ok(Err(never)) => match never {},
        Err(_) => Refusal::UpstreamTimeout.to_response().map(GuardBody::full),
    };
    response.headers_mut().insert(X_REQUEST_ID, id.clone());
    let extensions = response.extensions();
    let record = AccessRecord {
        request_id: id.to_str().unwrap_or_default(),
        peer: peer.ip().to_canonical(),
        status: response.status(),
        duration: started.elapsed(),
        guarded: extensions.get::<GuardedRequest>(),
        rejection: extensions.get::<Rejection>(),
        refusal: extensions.get::<Refusal>(),
        upstream: extensions.get::<UpstreamExchange>(),
        uniform: extensions.get::<UpstreamStatus>(),
        include_email: shared.include_email,
    };
    record.emit();
    let metrics = &shared.status.metrics;
    metrics.request(record.outcome(), record.duration);
    if let Some(exchange) = record.upstream {
        if let Some(status) = record.uniform.map(|u| u.0).or(exchange.status) {
            metrics.upstream(status.as_u16(), exchange.duration);
        }
    }
    Ok(response)
}
