//! The admin listener: `/healthz`, `/readyz`, `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use reset_guard::GuardHandle;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// The process-wide state the admin endpoints report on: draining, the guard (and its
/// store's health), the metrics.
#[derive(Debug)]
pub struct AdminState {
    /// Set once shutdown starts: readiness fails so load balancers stop sending traffic.
    pub draining: AtomicBool,
    pub guard: GuardHandle,
    pub metrics: Metrics,
}

impl AdminState {
    /// Ready to take traffic: not draining, and the limit store can serve.
    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.guard.store_ready()
    }
}

/// Admin connections served at once; more wait in the listen backlog. Probes and
/// scrapers need a few: without a bound, connections held open there took every file
/// descriptor the public listener needed.
pub const MAX_CONNECTIONS: usize = 64;
/// Admin connections one address may hold at once; more are closed as they come. One
/// client holding every place would keep the orchestrator's probes (from the node's
/// address) waiting until the pod is restarted.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// How long one admin connection may last, whatever it does: a client that sends
/// requests and never reads the answers is not dropped by the head's read timeout.
/// Prometheus and probes open a new one when theirs was closed.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

/// Serves the admin endpoints on `listener` until the process ends.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_peer = Arc::new(PerPeer::default());
    loop {
        let Ok(place) = places.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = crate::accept::accept(&listener).await;
        let Some(peer_place) = per_peer.take(peer.ip()) else {
            tracing::debug!(%peer, "admin connection closed: its address holds enough");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _peer_place = peer_place;
            let service = hyper::service::service_fn(move |request| answer(state.clone(), request));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(place);
        });
    }
}

/// The admin connections each address holds.
#[derive(Default)]
struct PerPeer(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One of an address's places, given back when dropped.
struct PeerPlace(Arc<PerPeer>, std::net::IpAddr);

impl PerPeer {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PeerPlace> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(ip).or_insert(0);
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerPlace(self.clone(), ip))
    }
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut held = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.1);
            }
        }
    }
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("admin.listen: cannot listen on {addr}"))
}

async fn answer(
    state: Arc<AdminState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut refused = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        refused.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return Ok(refused);
    }
    Ok(match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" if state.draining.load(Ordering::Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "rate-limit store unavailable\n",
        ),
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(state.metrics.render())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(Metrics::CONTENT_TYPE),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("valid"),
    );
    response
}
