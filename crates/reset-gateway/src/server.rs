//! The public listener: accepts connections, serves HTTP/1.1 and h2c through the guard
//! and the forwarder, and drains on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use reset_guard::{
    GuardBody, GuardHandle, GuardedRequest, PeerAddr, Rejection, ResetGuard, ResetGuardLayer,
    UpstreamStatus,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::config::Settings;
use crate::request_id::{self, X_REQUEST_ID};
use crate::telemetry::AccessRecord;
use crate::upstream::{ForwardBody, Forwarder, UpstreamExchange};

/// The body of every answer the gateway sends.
pub type GatewayBody = GuardBody<ForwardBody>;

/// A gateway bound to its listener, ready to [`run`](App::run).
pub struct App {
    listener: TcpListener,
    shared: Arc<Shared>,
    guard: GuardHandle,
    shutdown_grace: Duration,
    header_read_timeout: Duration,
}

/// What every connection reads.
struct Shared {
    service: ResetGuard<Forwarder>,
    include_email: bool,
}

/// Binds the listener and builds the service stack; no request is served until `run`.
pub async fn build(settings: Settings) -> anyhow::Result<App> {
    let listener = TcpListener::bind(settings.server.listen)
        .await
        .with_context(|| format!("server.listen: cannot listen on {}", settings.server.listen))?;
    let forwarder = Forwarder::new(settings.upstream.clone())?;
    let mut layer = ResetGuardLayer::builder(settings.guard.clone(), settings.api_key.clone())
        .store(settings.store.limits.clone());
    if let Some(secret) = &settings.store.key_secret {
        layer = layer.key_secret(secret);
    }
    let layer = layer.try_build().context("store.redis.url")?;
    let guard = layer.handle();
    // The guard sits in front of the forwarder: nothing it rejects costs an upstream call.
    let service = tower::ServiceBuilder::new().layer(layer).service(forwarder);
    Ok(App {
        listener,
        shared: Arc::new(Shared {
            service,
            include_email: settings.log.include_email,
        }),
        guard,
        shutdown_grace: settings.server.shutdown_grace,
        header_read_timeout: settings.server.header_read_timeout,
    })
}

impl App {
    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Swaps guard settings live.
    pub fn guard_handle(&self) -> GuardHandle {
        self.guard.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight
    /// requests finish for up to `server.shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .keep_alive(true);
        builder.http2().timer(TokioTimer::new());
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
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
            serve_connection(&builder, &graceful, self.shared.clone(), stream, peer);
        }
        drop(self.listener);
        tracing::info!(
            grace_secs = self.shutdown_grace.as_secs(),
            "draining connections"
        );
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(self.shutdown_grace) => tracing::warn!("shutdown grace elapsed with requests in flight"),
        }
        Ok(())
    }
}

fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request| handle(shared.clone(), peer, request));
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%peer, error = %error, "connection ended with an error");
        }
    });
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<GatewayBody>, Infallible> {
    let started = Instant::now();
    let id = request_id::resolve(request.headers());
    request
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), id.clone());
    request.extensions_mut().insert(PeerAddr(peer));
    let mut response = shared.service.clone().oneshot(request).await?;
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), id.clone());
    let extensions = response.extensions();
    AccessRecord {
        request_id: id.to_str().unwrap_or_default(),
        peer: peer.ip().to_canonical(),
        status: response.status(),
        duration: started.elapsed(),
        guarded: extensions.get::<GuardedRequest>(),
        rejection: extensions.get::<Rejection>(),
        upstream: extensions.get::<UpstreamExchange>(),
        uniform: extensions.get::<UpstreamStatus>(),
        include_email: shared.include_email,
    }
    .emit();
    Ok(response)
}
