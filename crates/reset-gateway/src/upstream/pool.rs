//! Connections to QuickBlox, one pool per worker thread: HTTP/1.1 connections kept idle
//! for the next request, or one shared HTTP/2 connection when TLS negotiates it.
//!
//! Until a connect has shown which of the two the upstream speaks (and whenever the HTTP/2
//! connection is gone), one request connects and the requests arriving meanwhile wait for
//! it: a burst at a fresh gateway opens one HTTP/2 connection, not one per request.
//!
//! It does what hyper-util's pooled client does for one origin, without what one origin
//! does not need (a map of hosts hashed several times per request, a connect future built
//! for every request): that was a tenth of the gateway's own work per forwarded request.
//! hyper-util's `client::pool` building blocks (cache, singleton, negotiate) measured 6% more
//! instructions per forwarded request than this pool (benches/README.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::header::HOST;
use http::uri::Scheme;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::UpstreamBody;

mod connect;
mod send_error;
mod singleton;

use connect::Fresh;
use send_error::again;
use singleton::{Turn, H2};

pub use send_error::SendError;

/// The connections of one worker to the upstream origin.
pub struct Pool {
    state: Arc<PoolState>,
}

/// A pool's connections and what it knows of the upstream, shared with its leases and
/// its reaper.
struct PoolState {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority` of the upstream: what is connected to.
    origin: Uri,
    /// The `Host` header of HTTP/1.1 requests.
    host: HeaderValue,
    max_idle: usize,
    idle_timeout: Duration,
    /// Bounds the name lookup, TCP and TLS together (the connector's own timeout covers
    /// TCP only).
    connect_timeout: Duration,
    /// HTTP/1.1 connections waiting for a request, the most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection, and the connect that may bring one.
    h2: Mutex<H2>,
    /// Wakes the requests waiting for the connect under way.
    connected: Notify,
    /// Whether the task closing long-idle connections runs.
    reaping: AtomicBool,
}

struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

impl Idle {
    /// Still open, and not idle for longer than `idle_timeout`.
    fn is_usable(&self, idle_timeout: Duration) -> bool {
        !self.sender.is_closed() && self.since.elapsed() < idle_timeout
    }
}

/// An HTTP/1.1 connection lent for one exchange: given back with [`Lease::release`] once
/// the answer has been read to its end, closed if dropped before.
pub struct Lease {
    sender: Option<http1::SendRequest<UpstreamBody>>,
    pool: Weak<PoolState>,
}

impl Lease {
    /// Puts the connection back for the next request.
    pub fn release(mut self) {
        if let (Some(sender), Some(pool)) = (self.sender.take(), self.pool.upgrade()) {
            pool.put_back(sender);
        }
    }

    fn none() -> Lease {
        Lease {
            sender: None,
            pool: Weak::new(),
        }
    }
}

impl Pool {
    /// A pool for `origin`, which has a scheme and an authority.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: Uri,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> anyhow::Result<Pool> {
        let authority = origin
            .authority()
            .ok_or_else(|| anyhow::anyhow!("upstream.url has no host"))?;
        let default_port = if origin.scheme() == Some(&Scheme::HTTPS) {
            443
        } else {
            80
        };
        // As browsers and hyper-util write it: the port only when it is not the default.
        let host = match authority.port_u16() {
            Some(port) if port != default_port => authority.as_str().to_owned(),
            _ => authority.host().to_owned(),
        };
        let plain = origin.scheme() != Some(&Scheme::HTTPS);
        Ok(Pool {
            state: Arc::new(PoolState {
                connector,
                host: HeaderValue::from_str(&host)?,
                origin,
                max_idle,
                idle_timeout,
                connect_timeout,
                idle: Mutex::new(Vec::new()),
                // Plain HTTP is HTTP/1.1: only TLS can negotiate HTTP/2.
                h2: Mutex::new(H2::new(plain)),
                connected: Notify::new(),
                reaping: AtomicBool::new(false),
            }),
        })
    }

    /// Sends `request` (its URI the target on the upstream origin: path and query) on an
    /// idle connection, the HTTP/2 connection, or a new one. A request that finds neither
    /// while another is connecting (and the upstream may speak HTTP/2) waits for that connect
    /// and then uses what it brought, or fails as it did.
    ///
    /// A kept connection may have been closed by QuickBlox (or a load balancer) while idle,
    /// and the request may find out only once on it. Then the kept connections are dropped
    /// and the request goes on a new one: as it was if the connection never took it, or
    /// built again by `replay` (a `GET`, as browsers and Go's client retry idempotent
    /// requests) if the connection failed before any answer, the sign of a close it raced
    /// with.
    pub async fn send(
        &self,
        mut request: Request<UpstreamBody>,
        replay: Option<&(dyn Fn() -> Request<UpstreamBody> + Sync)>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let state = &self.state;
        let connecting = loop {
            while let Some(mut sender) = state.take_idle() {
                if sender.ready().await.is_err() {
                    continue;
                }
                match sender.try_send_request(for_h1(request, &state.host)).await {
                    Ok(response) => return Ok((response, state.lease(sender))),
                    Err(error) => {
                        // The other kept connections are likely as dead: new ones. Not
                        // when the client's own body failed the exchange (it broke off):
                        // that says nothing of the others.
                        if !error.error().is_user() {
                            lock(&state.idle).clear();
                        }
                        request = again(error, replay)?;
                    }
                }
            }
            match state.turn() {
                Turn::Use(number, mut sender) => {
                    if sender.ready().await.is_ok() {
                        match sender
                            .try_send_request(for_h2(request, &state.origin))
                            .await
                        {
                            Ok(response) => return Ok((response, Lease::none())),
                            Err(error) => request = again(error, replay)?,
                        }
                    }
                    state.forget_h2(number);
                }
                Turn::Wait(connected, attempt) => {
                    connected.await;
                    if let Some(error) = state.failed(attempt) {
                        return Err(SendError::Shared(error));
                    }
                }
                Turn::Connect(connecting) => break connecting,
            }
        };
        // Boxed: connecting (TCP, TLS, handshakes) is rare and its state is large, and every
        // request's future would otherwise be as large as it.
        let fresh = Box::pin(state.connect()).await;
        let fresh = state.record(fresh, connecting.as_ref().map(|c| c.attempt));
        // Wakes the requests waiting on this connect, now that it is recorded.
        drop(connecting);
        match fresh? {
            Fresh::H1(mut sender) => {
                let response = sender
                    .send_request(for_h1(request, &state.host))
                    .await
                    .map_err(SendError::Exchange)?;
                Ok((response, state.lease(sender)))
            }
            Fresh::H2(mut sender) => {
                let response = sender
                    .send_request(for_h2(request, &state.origin))
                    .await
                    .map_err(SendError::Exchange)?;
                Ok((response, Lease::none()))
            }
        }
    }
}

impl PoolState {
    /// The most recently used idle connection still worth trying; older ones that sat
    /// too long or were closed are dropped on the way.
    fn take_idle(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = lock(&self.idle);
        while let Some(entry) = idle.pop() {
            if entry.is_usable(self.idle_timeout) {
                return Some(entry.sender);
            }
        }
        None
    }

    fn lease(self: &Arc<Self>, sender: http1::SendRequest<UpstreamBody>) -> Lease {
        Lease {
            sender: Some(sender),
            pool: Arc::downgrade(self),
        }
    }

    fn put_back(self: Arc<Self>, sender: http1::SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        {
            let mut idle = lock(&self.idle);
            if idle.len() >= self.max_idle {
                return;
            }
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
        // Given back from a drop outside any event loop (at shutdown), it is not reaped.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            if !self.reaping.swap(true, Ordering::Relaxed) {
                runtime.spawn(reap(Arc::downgrade(&self), self.idle_timeout));
            }
        }
    }
}

/// Closes connections idle for longer than `idle_timeout`, until the pool is gone.
async fn reap(pool: Weak<PoolState>, idle_timeout: Duration) {
    let period = (idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        lock(&pool.idle).retain(|entry| entry.is_usable(idle_timeout));
    }
}

/// HTTP/1.1 sends the target as it is, with a `Host` header.
fn for_h1(mut request: Request<UpstreamBody>, host: &HeaderValue) -> Request<UpstreamBody> {
    request.headers_mut().insert(HOST, host.clone());
    request
}

/// HTTP/2 carries the scheme and authority in the request itself: no `Host` header.
fn for_h2(mut request: Request<UpstreamBody>, origin: &Uri) -> Request<UpstreamBody> {
    let mut parts = origin.clone().into_parts();
    parts.path_and_query = request.uri().path_and_query().cloned();
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    request.headers_mut().remove(HOST);
    request
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here is left half-changed by a panic: keep using it.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
