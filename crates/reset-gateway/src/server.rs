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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use reset_guard::{
    GuardBody, GuardHandle, GuardedRequest, PeerAddr, Rejection, ResetGuard, ResetGuardLayer,
    UpstreamStatus, RATELIMIT, RATELIMIT_POLICY,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::util::Either;
use tower::ServiceExt;
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};

use crate::admin::{self, Status};
use crate::config::Settings;
use crate::metrics::Metrics;
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
    listener: TcpListener,
    admin: TcpListener,
    shared: Arc<Shared>,
    status: Arc<Status>,
    forwarder: Forwarder,
    certs: Option<Arc<CertStore>>,
    tls: Option<TlsAcceptor>,
    settings: Settings,
}

/// What every connection reads.
struct Shared {
    service: Stack,
    include_email: bool,
    request_timeout: Duration,
    status: Arc<Status>,
}

/// Binds the listeners and builds the service stack; no request is served until `run`.
pub async fn build(settings: Settings) -> anyhow::Result<App> {
    let listener = TcpListener::bind(settings.server.listen)
        .await
        .with_context(|| format!("server.listen: cannot listen on {}", settings.server.listen))?;
    let admin = admin::bind(settings.server.admin_listen).await?;
    let forwarder = Forwarder::new(settings.upstream.clone())?;
    let mut layer = ResetGuardLayer::builder(settings.guard.clone(), settings.api_key.clone())
        .store(settings.store.limits.clone());
    if let Some(secret) = &settings.store.key_secret {
        layer = layer.key_secret(secret);
    }
    let layer = layer.try_build().context("store.redis.url")?;
    let guard = layer.handle();
    let status = Arc::new(Status {
        draining: Default::default(),
        metrics: Metrics::new(guard.clone()),
        guard,
    });
    let (certs, tls) = match &settings.server.tls {
        Some(files) => {
            let certs = CertStore::load(files)?;
            let acceptor = certs.acceptor()?;
            (Some(certs), Some(acceptor))
        }
        None => (None, None),
    };
    let service = tower::ServiceBuilder::new()
        // CORS first: a browser's preflight is answered here, before any check.
        .option_layer(cors(&settings))
        // The guard sits in front of the forwarder: nothing it rejects costs an upstream call.
        .layer(layer)
        .service(forwarder.clone());
    Ok(App {
        listener,
        admin,
        shared: Arc::new(Shared {
            service,
            include_email: settings.log.include_email,
            request_timeout: settings.server.request_timeout,
            status: status.clone(),
        }),
        status,
        forwarder,
        certs,
        tls,
        settings,
    })
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
                HeaderName::from_static(reset_guard::QB_TOKEN),
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
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
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
            self.forwarder.clone(),
            self.certs.clone(),
            &self.settings,
        )
    }

    /// Serves until `shutdown` completes, then reports not ready, stops accepting and lets
    /// in-flight requests finish for up to `server.shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let server = &self.settings.server;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // Also closes keep-alive connections idle for that long between requests.
            .header_read_timeout(server.header_read_timeout)
            .max_buf_size(server.max_header_bytes)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20));
        tokio::spawn(admin::serve(self.admin, self.status.clone()));
        let connections = Arc::new(Semaphore::new(server.max_connections));
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            // Beyond max_connections, new connections wait in the kernel's backlog rather
            // than being accepted and starving the ones being served.
            let permit = tokio::select! {
                permit = connections.clone().acquire_owned() => permit.expect("never closed"),
                () = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let connection = Connection {
                builder: builder.clone(),
                shared: self.shared.clone(),
                peer,
            };
            match &self.tls {
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let watcher = graceful.watcher();
                    let handshake_timeout = server.header_read_timeout;
                    tokio::spawn(async move {
                        let _permit = permit;
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                        {
                            Ok(Ok(tls)) => connection.serve(tls, |c| watcher.watch(c)).await,
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, %error, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
                None => {
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let _permit = permit;
                        connection.serve(stream, |c| watcher.watch(c)).await;
                    });
                }
            }
        }
        self.status.draining.store(true, Ordering::Relaxed);
        drop(self.listener);
        tracing::info!(
            grace_secs = server.shutdown_grace.as_secs(),
            "draining connections"
        );
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(server.shutdown_grace) => tracing::warn!("shutdown grace elapsed with requests in flight"),
        }
        Ok(())
    }
}

struct Connection {
    builder: auto::Builder<TokioExecutor>,
    shared: Arc<Shared>,
    peer: SocketAddr,
}

impl Connection {
    async fn serve<I, W, F>(self, io: I, watch: W)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        W: FnOnce(auto::Connection<'static, TokioIo<I>, GatewayService, TokioExecutor>) -> F,
        F: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
    {
        let Connection {
            builder,
            shared,
            peer,
        } = self;
        let service = GatewayService { shared, peer };
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        if let Err(error) = watch(connection).await {
            tracing::debug!(%peer, error = %error, "connection ended with an error");
        }
    }
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
    request.headers_mut().insert(X_REQUEST_ID, id.clone());
    request.extensions_mut().insert(PeerAddr(peer));
    let answer = shared.service.clone().oneshot(request);
    let mut response = match tokio::time::timeout(shared.request_timeout, answer).await {
        Ok(Ok(response)) => response,
        Ok(Err(never)) => match never {},
        Err(_) => {
            let rejection = Rejection::UpstreamTimeout;
            let mut response = rejection.to_response().map(GuardBody::full);
            response.extensions_mut().insert(rejection);
            response
        }
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
