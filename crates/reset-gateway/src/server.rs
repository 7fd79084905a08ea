//! The public listener: accepts connections (TLS optional, bounded in number), serves
//! HTTP/1.1 and HTTP/2 through CORS, the guard and the forwarder, and drains on shutdown.
//!
//! This module binds the sockets, builds one service stack per worker and starts the
//! worker threads; `worker` is a worker's accept loop, `connection` one connection and
//! its protocol, `handler` what happens to each request.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use http::header::{ALLOW, RETRY_AFTER};
use http::Method;
use reset_guard::{GuardHandle, ResetGuardLayer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::admin::{self, AdminState};
use crate::config::Settings;
use crate::header_names::{RATELIMIT, RATELIMIT_POLICY};
use crate::metrics::{Metrics, StoreWaits};
use crate::reload::Reloader;
use crate::request_id::X_REQUEST_ID;
use crate::telemetry::DenialLog;
use crate::tls::CertStore;
use crate::upstream::Forwarder;

mod connection;
mod handler;
mod idle;
mod send_timeout;
mod worker;

use connection::Protocols;
use handler::WorkerContext;
use worker::Worker;

pub use handler::GatewayBody;

/// A gateway bound to its listeners, ready to [`run`](App::run).
pub struct App {
    /// One listener per worker: duplicates of one socket.
    listeners: Vec<std::net::TcpListener>,
    addr: SocketAddr,
    admin: TcpListener,
    /// One service stack per worker; each has its own upstream pool.
    workers: Vec<Arc<WorkerContext>>,
    state: Arc<AdminState>,
    denials: Arc<DenialLog>,
    forwarders: Vec<Forwarder>,
    certs: Option<Arc<CertStore>>,
    tls: Option<TlsAcceptor>,
    settings: Settings,
}

/// Binds the listeners and builds the service stacks; no request is served until `run`.
pub async fn build(settings: Settings) -> anyhow::Result<App> {
    let server = &settings.server;
    let listeners = bind_listeners(server.listen, server.workers)
        .with_context(|| format!("server.listen: cannot listen on {}", server.listen))?;
    let addr = listeners[0].local_addr()?;
    let admin = admin::bind(server.admin_listen).await?;
    let store_waits = StoreWaits::default();
    let observed = store_waits.clone();
    let mut layer = ResetGuardLayer::builder(settings.guard.clone(), settings.api_key.clone())
        .store(settings.store.limits.clone())
        .on_store_wait(move |waited| observed.observe(waited));
    if let Some(secret) = &settings.store.key_secret {
        layer = layer.key_secret(secret);
    }
    // The gateway's TLS names its provider; the Redis client's (rediss://) takes the
    // process's, which is the same ring. Already installed (a second gateway in one
    // process): kept.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One guard for all workers: the limits are the process's, not a worker's. Its
    // housekeeping (idle-key sweeps, the Redis probe) runs on the caller's runtime.
    let (layer, housekeeping) = layer.build().context("store.redis")?;
    tokio::spawn(housekeeping);
    let guard = layer.handle();
    let state = Arc::new(AdminState {
        draining: Default::default(),
        metrics: Metrics::new(guard.clone(), store_waits),
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
    let denials = Arc::new(DenialLog::new(&settings.log));
    tokio::spawn(denials.clone().sweep_periodically());
    let mut forwarders = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..listeners.len() {
        let cors = cors(&settings);
        let forwarder = Forwarder::new(settings.upstream.clone(), cors.is_some())?;
        let service = tower::ServiceBuilder::new()
            // CORS first: a browser's preflight is answered here, before any check.
            .option_layer(cors.clone())
            // The guard sits in front of the forwarder: nothing it rejects costs an upstream call.
            .layer(layer.clone())
            .service(forwarder.clone());
        forwarders.push(forwarder);
        workers.push(Arc::new(WorkerContext {
            service,
            cors,
            include_email: settings.log.include_email,
            denials: denials.clone(),
            request_timeout: server.request_timeout,
            max_uri_bytes: server.max_uri_bytes,
            state: state.clone(),
        }));
    }
    Ok(App {
        listeners,
        addr,
        admin,
        workers,
        state,
        denials,
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
            .allow_headers(settings.server.cors_allow_headers.clone())
            .allow_credentials(settings.server.cors_allow_credentials)
            // `Allow` too: a 405 names the methods the path takes.
            .expose_headers([
                RETRY_AFTER,
                RATELIMIT,
                RATELIMIT_POLICY,
                X_REQUEST_ID,
                ALLOW,
            ])
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
        self.state.guard.clone()
    }

    /// What reloads the configuration from `path` into this running gateway.
    pub fn reloader(&self, path: std::path::PathBuf) -> Reloader {
        Reloader::new(
            path,
            self.state.clone(),
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
        self.run_until(shutdown, std::future::pending()).await
    }

    /// [`run`](Self::run), and once `now` completes during the drain, the requests still
    /// in flight are cut at once, as when the grace runs out (each gets its `cut` line).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()>,
        now: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let server = self.settings.server.clone();
        tokio::spawn(admin::serve(self.admin, self.state.clone()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (cut, cutting) = tokio::sync::watch::channel(false);
        // max_connections split exactly (3 over 2 workers: 2 and 1); each worker at least 1,
        // or its listener's share of new connections would wait for ever.
        let workers = self.workers.len();
        let share = |index: usize| {
            let (each, rest) = (
                server.max_connections / workers,
                server.max_connections % workers,
            );
            (each + usize::from(index < rest)).max(1)
        };
        let mut finished = Vec::new();
        for (index, (listener, context)) in self.listeners.into_iter().zip(self.workers).enumerate()
        {
            let worker = Worker {
                listener,
                context,
                protocols: Protocols::new(&server),
                tls: self.tls.clone(),
                proxy: server.proxy_protocol.clone().map(Arc::new),
                head_timeout: server.header_read_timeout,
                grace: server.shutdown_grace,
                max_connections: share(index),
                stop: stopped.clone(),
                cut: cutting.clone(),
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
        self.state.draining.store(true, Ordering::Relaxed);
        tracing::info!(
            grace_secs = server.shutdown_grace.as_secs(),
            "draining connections"
        );
        let _ = stop.send(true);
        let mut now = std::pin::pin!(now);
        let mut cutting = false;
        for mut finish in finished {
            let finished = tokio::select! {
                finished = &mut finish => finished,
                () = &mut now, if !cutting => {
                    cutting = true;
                    let _ = cut.send(true);
                    finish.await
                }
            };
            finished.context("a worker thread died")??;
        }
        // The denials folded since the last sweep: a recording stays complete.
        self.denials.drain();
        Ok(())
    }
}
