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

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::header::HOST;
use http::uri::Scheme;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::ServiceExt;

use super::UpstreamBody;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why an exchange failed before an answer arrived.
#[derive(Debug)]
pub enum SendError {
    /// No connection: refused, timed out, TLS.
    Connect(BoxError),
    /// The connection failed while the request was on it.
    Exchange(hyper::Error),
    /// The connect that this request and others waited for failed so.
    Shared(Arc<SendError>),
}

impl SendError {
    /// The failure and its causes, innermost last.
    pub fn chain(&self) -> impl Iterator<Item = &(dyn StdError + 'static)> {
        let first: &(dyn StdError + 'static) = match self {
            SendError::Connect(error) => error.as_ref(),
            SendError::Exchange(error) => error,
            SendError::Shared(error) => return error.chain(),
        };
        std::iter::successors(Some(first), |&e| e.source())
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(error) => write!(f, "connect: {error}"),
            SendError::Exchange(error) => write!(f, "exchange: {error}"),
            SendError::Shared(error) => error.fmt(f),
        }
    }
}

/// The connections of one worker to the upstream origin.
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority` of the upstream: what is connected to.
    origin: Uri,
    /// The `Host` header of HTTP/1.1 requests.
    host: HeaderValue,
    max_idle: usize,
    idle_timeout: Duration,
    /// HTTP/1.1 connections waiting for a request, the most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection, and the connect that may bring one.
    h2: Mutex<H2>,
    /// Wakes the requests waiting for the connect under way.
    connected: Notify,
    /// Whether the task closing long-idle connections runs.
    reaping: AtomicBool,
}

struct H2 {
    /// The HTTP/2 connection, when the upstream chose HTTP/2, and its number.
    sender: Option<(u64, http2::SendRequest<UpstreamBody>)>,
    /// How many HTTP/2 connections were made.
    made: u64,
    /// The last connect negotiated HTTP/1.1 (or the origin is `http://`): each request
    /// without an idle connection connects on its own.
    http1: bool,
    /// A request is connecting, and those without a connection wait for it.
    connecting: bool,
    /// The number of the latest connect waited for.
    attempt: u64,
    /// The latest such connect that failed, by number, for the requests that waited on it.
    failed: Option<(u64, Arc<SendError>)>,
}

/// What a request without an idle HTTP/1.1 connection does.
enum Turn<'a> {
    /// Sends on the HTTP/2 connection numbered so.
    Use(u64, http2::SendRequest<UpstreamBody>),
    /// Waits for the connect numbered so that another request is making.
    Wait(Pin<Box<Notified<'a>>>, u64),
    /// Connects, for itself alone or (with a guard) for those that will wait on it.
    Connect(Option<Connecting<'a>>),
}

/// The connect that other requests wait for. Dropped, it wakes them: when the connect ended
/// (they find its connection or its failure) or when the request making it was dropped
/// before (one of them connects instead).
struct Connecting<'a> {
    shared: &'a Shared,
    attempt: u64,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        lock(&self.shared.h2).connecting = false;
        self.shared.connected.notify_waiters();
    }
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
    pool: Weak<Shared>,
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

enum Fresh {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

impl Pool {
    /// A pool for `origin`, which has a scheme and an authority.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: Uri,
        max_idle: usize,
        idle_timeout: Duration,
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
            shared: Arc::new(Shared {
                connector,
                host: HeaderValue::from_str(&host)?,
                origin,
                max_idle,
                idle_timeout,
                idle: Mutex::new(Vec::new()),
                h2: Mutex::new(H2 {
                    sender: None,
                    made: 0,
                    // Plain HTTP is HTTP/1.1: only TLS can negotiate HTTP/2.
                    http1: plain,
                    connecting: false,
                    attempt: 0,
                    failed: None,
                }),
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
        let shared = &self.shared;
        let connecting = loop {
            while let Some(mut sender) = shared.take_idle() {
                if sender.ready().await.is_err() {
                    continue;
                }
                match sender.try_send_request(for_h1(request, &shared.host)).await {
                    Ok(response) => return Ok((response, shared.lease(sender))),
                    Err(error) => {
                        // The other kept connections are likely as dead: new ones.
                        lock(&shared.idle).clear();
                        request = again(error, replay)?;
                    }
                }
            }
            match shared.turn() {
                Turn::Use(number, mut sender) => {
                    if sender.ready().await.is_ok() {
                        match sender
                            .try_send_request(for_h2(request, &shared.origin))
                            .await
                        {
                            Ok(response) => return Ok((response, Lease::none())),
                            Err(error) => request = again(error, replay)?,
                        }
                    }
                    shared.forget_h2(number);
                }
                Turn::Wait(connected, attempt) => {
                    connected.await;
                    if let Some(error) = shared.failed(attempt) {
                        return Err(SendError::Shared(error));
                    }
                }
                Turn::Connect(connecting) => break connecting,
            }
        };
        // Boxed: connecting (TCP, TLS, handshakes) is rare and its state is large, and every
        // request's future would otherwise be as large as it.
        let fresh = Box::pin(shared.connect()).await;
        let fresh = shared.record(fresh, connecting.as_ref().map(|c| c.attempt));
        // Wakes the requests waiting on this connect, now that it is recorded.
        drop(connecting);
        match fresh? {
            Fresh::H1(mut sender) => {
                let response = sender
                    .send_request(for_h1(request, &shared.host))
                    .await
                    .map_err(SendError::Exchange)?;
                Ok((response, shared.lease(sender)))
            }
            Fresh::H2(mut sender) => {
                let response = sender
                    .send_request(for_h2(request, &shared.origin))
                    .await
                    .map_err(SendError::Exchange)?;
                Ok((response, Lease::none()))
            }
        }
    }
}

impl Shared {
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

    /// The HTTP/2 connection if there is one; else whether to wait for the connect under
    /// way or to make one, for others to wait on unless the upstream speaks HTTP/1.1.
    fn turn(&self) -> Turn<'_> {
        let mut h2 = lock(&self.h2);
        if let Some((number, sender)) = &h2.sender {
            if !sender.is_closed() {
                return Turn::Use(*number, sender.clone());
            }
            h2.sender = None;
        }
        if h2.http1 {
            return Turn::Connect(None);
        }
        if h2.connecting {
            // Made under the lock, so the wake-up that ends the connect cannot come before it.
            return Turn::Wait(Box::pin(self.connected.notified()), h2.attempt);
        }
        h2.connecting = true;
        h2.attempt += 1;
        Turn::Connect(Some(Connecting {
            shared: self,
            attempt: h2.attempt,
        }))
    }

    /// What a connect brought: an HTTP/2 connection kept for every request, the knowledge
    /// that the upstream speaks HTTP/1.1, or (for connect `attempt`, which others waited
    /// on) a failure they share.
    fn record(
        &self,
        fresh: Result<Fresh, SendError>,
        attempt: Option<u64>,
    ) -> Result<Fresh, SendError> {
        let mut h2 = lock(&self.h2);
        match fresh {
            Ok(Fresh::H2(sender)) => {
                h2.made += 1;
                h2.sender = Some((h2.made, sender.clone()));
                h2.http1 = false;
                Ok(Fresh::H2(sender))
            }
            Ok(Fresh::H1(sender)) => {
                h2.http1 = true;
                Ok(Fresh::H1(sender))
            }
            Err(error) => match attempt {
                Some(attempt) => {
                    let error = Arc::new(error);
                    h2.failed = Some((attempt, error.clone()));
                    Err(SendError::Shared(error))
                }
                None => Err(error),
            },
        }
    }

    /// Drops HTTP/2 connection `number`, which failed a request, unless already replaced.
    fn forget_h2(&self, number: u64) {
        let mut h2 = lock(&self.h2);
        if h2
            .sender
            .as_ref()
            .is_some_and(|(current, _)| *current == number)
        {
            h2.sender = None;
        }
    }

    /// The failure of connect `attempt`, if it failed.
    fn failed(&self, attempt: u64) -> Option<Arc<SendError>> {
        match &lock(&self.h2).failed {
            Some((failed, error)) if *failed == attempt => Some(error.clone()),
            _ => None,
        }
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

    async fn connect(&self) -> Result<Fresh, SendError> {
        let io = self
            .connector
            .clone()
            .oneshot(self.origin.clone())
            .await
            .map_err(SendError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(SendError::Exchange)?;
            run_connection(connection, "HTTP/2");
            return Ok(Fresh::H2(sender));
        }
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::Exchange)?;
        run_connection(connection, "HTTP/1.1");
        Ok(Fresh::H1(sender))
    }
}

/// Runs a connection's I/O on this worker's event loop until it ends.
fn run_connection(
    connection: impl Future<Output = hyper::Result<()>> + Send + 'static,
    protocol: &'static str,
) {
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, protocol, "upstream connection ended");
        }
    });
}

/// Closes connections idle for longer than `idle_timeout`, until the pool is gone.
async fn reap(pool: Weak<Shared>, idle_timeout: Duration) {
    let period = (idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        lock(&pool.idle).retain(|entry| entry.is_usable(idle_timeout));
    }
}

/// The request to send on a new connection after a kept one failed it: the request itself
/// if the connection never took it, or one `replay` builds again if the connection failed
/// the way a close it raced with looks; else the failure.
fn again(
    mut error: TrySendError<Request<UpstreamBody>>,
    replay: Option<&(dyn Fn() -> Request<UpstreamBody> + Sync)>,
) -> Result<Request<UpstreamBody>, SendError> {
    match (error.take_message(), replay) {
        (Some(unsent), _) => Ok(unsent),
        (None, Some(replay)) if closed_under(error.error()) => Ok(replay()),
        (None, _) => Err(SendError::Exchange(error.into_error())),
    }
}

/// A kept connection that the other side closed as the request went out: no answer at
/// all, or the connection reset, broken or ended (TLS without its close) under the write.
fn closed_under(error: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    error.is_incomplete_message()
        || std::iter::successors(error.source(), |&e| e.source()).any(|cause| {
            cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
                )
            })
        })
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
