//! The per-request handler: refuses malformed requests, runs the service stack (CORS, the
//! guard, the forwarder) under the request timeout, and records the access log line and
//! the metrics.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::ACCESS_CONTROL_ALLOW_ORIGIN;
use http::{Request, Response};
use hyper::body::Incoming;
use reset_guard::Attribution;
use reset_guard::{
    ClientIp, GuardBody, GuardedRequest, PeerAddr, Rejection, ResetGuard, UpstreamStatus,
};
use tokio::time::Instant;
use tower::util::Either;
use tower::ServiceExt;
use tower_http::cors::{Cors, CorsLayer};

use super::idle::{Activity, RequestOpen, TrackedBody};
use crate::admin::AdminState;
use crate::refusal::Refusal;
use crate::request_id::{self, X_REQUEST_ID};
use crate::telemetry::{AccessRecord, DenialLog};
use crate::upstream::{ForwardBody, Forwarder, UpstreamExchange};

/// The body of every answer the gateway sends.
pub type GatewayBody = GuardBody<ForwardBody>;

/// One worker's service stack: CORS (when origins are configured), the guard, the forwarder.
pub(super) type Stack = Either<Cors<ResetGuard<Forwarder>>, ResetGuard<Forwarder>>;

/// What every connection of one worker reads.
pub(super) struct WorkerContext {
    pub(super) service: Stack,
    /// The CORS layer of `service`, when on: for the answers made outside it.
    pub(super) cors: Option<CorsLayer>,
    pub(super) include_email: bool,
    pub(super) denials: Arc<DenialLog>,
    pub(super) request_timeout: Duration,
    pub(super) max_uri_bytes: usize,
    pub(super) state: Arc<AdminState>,
}

/// Requests a careful HTTP server refuses before looking at what they ask (RFC 9112
/// §3.2): more than one Host, a Host that is no host (`a b`, `a/b`), an HTTP/1.1 request
/// without one (unless its target names the host: absolute-form, as nginx takes it); or a
/// target longer than `max_uri`.
fn malformed<B>(request: &Request<B>, max_uri: usize) -> Option<Refusal> {
    let uri_len = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if uri_len > max_uri {
        return Some(Refusal::TargetTooLong);
    }
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Some(Refusal::HostRequired),
        (Some(host), None) if !is_host(host.as_bytes()) => Some(Refusal::HostRequired),
        (None, _)
            if request.version() == http::Version::HTTP_11
                && request.uri().authority().is_none() =>
        {
            Some(Refusal::HostRequired)
        }
        _ => None,
    }
}

/// Whether a Host value is `uri-host [ ":" port ]` as far as its bytes go: a registered
/// name, an IPv4 address or a bracketed IPv6 one (RFC 3986's unreserved, sub-delims,
/// percent-encoding, `:` and brackets). Empty is allowed (RFC 9112 §3.2).
fn is_host(value: &[u8]) -> bool {
    value.iter().all(|b| HOST_BYTES[usize::from(*b)])
}

/// The bytes a Host may hold, by value: one load per byte (every request has a Host).
static HOST_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
            );
        b += 1;
    }
    table
};

/// One connection's view of the gateway.
#[derive(Clone)]
pub(super) struct GatewayService {
    context: Arc<WorkerContext>,
    /// The client: the TCP peer, or the address a trusted load balancer's PROXY protocol
    /// header named. Every request of the connection is the client's (`PeerAddr`).
    peer: SocketAddr,
    /// Where an HTTP/2 connection counts its open requests (idle.rs).
    activity: Option<Arc<Activity>>,
    /// Set at the first request, for a connection whose first head has a deadline of its
    /// own (connection.rs).
    first_request: Option<Arc<AtomicBool>>,
}

impl GatewayService {
    pub(super) fn new(context: Arc<WorkerContext>, peer: SocketAddr) -> Self {
        GatewayService {
            context,
            peer,
            activity: None,
            first_request: None,
        }
    }

    /// Sets `began` at the first request.
    pub(super) fn noting_the_first_request(self, began: Arc<AtomicBool>) -> Self {
        GatewayService {
            first_request: Some(began),
            ..self
        }
    }

    /// Counts each request in `activity` while it is open.
    pub(super) fn counting(self, activity: Arc<Activity>) -> Self {
        GatewayService {
            activity: Some(activity),
            ..self
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for GatewayService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        // Over HTTP/2 the request stays open until its answer's body is done (idle.rs).
        let open = self.activity.as_ref().map(|activity| activity.begin());
        if let Some(began) = &self.first_request {
            began.store(true, Ordering::Relaxed);
        }
        Box::pin(handle(self.context.clone(), self.peer, request, open))
    }
}

/// Answers `request`; over HTTP/2, `open` keeps it open until its answer's body is done.
async fn handle(
    context: Arc<WorkerContext>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
    open: Option<RequestOpen>,
) -> Result<Response<TrackedBody>, Infallible> {
    let started = Instant::now();
    let received = std::time::SystemTime::now();
    let id = request_id::resolve(request.headers());
    let head_over_h2 =
        request.method() == http::Method::HEAD && request.version() == http::Version::HTTP_2;
    let origin = context
        .cors
        .as_ref()
        .and_then(|_| request.headers().get(http::header::ORIGIN).cloned());
    // What the CORS layer answers itself; any other OPTIONS goes to the guard as any method.
    let preflight = origin.is_some()
        && request.method() == http::Method::OPTIONS
        && request
            .headers()
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
    // A refusal made here, before the guard: a malformed request, or one out of time.
    let (mut response, mut refused) = match malformed(&request, context.max_uri_bytes) {
        Some(refusal) => {
            let mut response = refusal.to_response().map(GuardBody::full);
            // Its line names the client behind trusted proxies, as the guard's would.
            let client = context.state.guard.client_ip(peer.ip(), request.headers());
            response.extensions_mut().insert(client);
            (response, Some(refusal))
        }
        None => {
            request.headers_mut().insert(X_REQUEST_ID, id.clone());
            request.extensions_mut().insert(PeerAddr(peer));
            let unanswered = Unanswered {
                context: &context,
                request_id: &id,
                received,
                peer,
                started,
            };
            let answer = answer(&context, request, preflight).await;
            std::mem::forget(unanswered);
            answer
        }
    };
    match (&context.cors, origin) {
        // A browser would refuse the call anyway: the 403 says why to whoever reads it.
        _ if preflight
            && refused.is_none()
            && !response.headers().contains_key(ACCESS_CONTROL_ALLOW_ORIGIN) =>
        {
            let refusal = Refusal::OriginNotAllowed;
            response = refusal.to_response().map(GuardBody::full);
            refused = Some(refusal);
        }
        // An answer made outside the stack, readable by the page as any other.
        (Some(cors), Some(origin)) if refused.is_some() => {
            // Boxed: rare, and every request's future would otherwise hold its room.
            response = Box::pin(with_cors(cors, origin, response)).await;
        }
        _ => {}
    }
    response.headers_mut().insert(X_REQUEST_ID, id.clone());
    let extensions = response.extensions();
    let upstream = extensions.get::<UpstreamExchange>();
    let record = AccessRecord {
        request_id: id.to_str().unwrap_or_default(),
        received,
        peer: peer.ip().to_canonical(),
        status: response.status(),
        duration: started.elapsed(),
        guarded: extensions.get::<GuardedRequest>(),
        attribution: extensions.get::<Attribution>(),
        client: extensions.get::<ClientIp>(),
        rejection: extensions.get::<Rejection>(),
        cut: false,
        preflight: preflight && refused.is_none(),
        refusal: refused.or(upstream.and_then(|u| u.refusal)),
        upstream,
        uniform: extensions.get::<UpstreamStatus>(),
        include_email: context.include_email,
    };
    record.emit(&context.denials);
    let metrics = &context.state.metrics;
    metrics.request(record.outcome(), record.duration);
    // QuickBlox's answers to resets only: a route passed through (other_routes: forward)
    // answers for itself, and its 401s say nothing of the API key.
    if let (Some(exchange), Some(_)) = (record.upstream, record.guarded) {
        match record.uniform.map(|u| u.0).or(exchange.status) {
            Some(status) => metrics.upstream(status.as_u16(), exchange.duration),
            // No answer (timed out, refused, cut): its wait is still QuickBlox's latency,
            // or a slowdown that ends in timeouts would empty the latency panel.
            None => metrics.upstream_failed(exchange.duration),
        }
    }
    if head_over_h2 {
        without_body(&mut response);
    }
    Ok(response.map(|body| TrackedBody::new(body, open)))
}

/// `response`, made outside the service stack, with the CORS headers the stack gives an
/// answer to a request from `origin` (none if it is not allowed).
async fn with_cors(
    cors: &CorsLayer,
    origin: http::HeaderValue,
    response: Response<GatewayBody>,
) -> Response<GatewayBody> {
    use tower::Layer as _;
    let mut made = Some(response);
    let answered = tower::service_fn(move |_: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(made.take().unwrap_or_default()))
    });
    let mut asked = Request::new(());
    asked.headers_mut().insert(http::header::ORIGIN, origin);
    match cors.layer(answered).oneshot(asked).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// An answer to HEAD carries no body. hyper leaves one out over HTTP/1.1 itself, but over
/// HTTP/2 it sends what it is given, and a client that receives DATA on an answer to HEAD
/// fails the stream (`PROTOCOL_ERROR`). Its `Content-Length` stays the body's, as a GET's;
/// a body already at its end says nothing of the length (a forwarded HEAD's, which
/// QuickBlox's own `Content-Length` describes if it sent one), as hyper's HTTP/2 server reads it.
fn without_body(response: &mut Response<GatewayBody>) {
    use http_body::Body as _;
    let body = response.body();
    if let Some(length) = body.size_hint().exact().filter(|_| !body.is_end_stream()) {
        response
            .headers_mut()
            .entry(http::header::CONTENT_LENGTH)
            .or_insert_with(|| length.into());
    }
    *response.body_mut() = GuardBody::default();
}

/// A request waiting for its answer (on QuickBlox, Redis, or `min_latency`). Dropped
/// before its answer was made, which happens only when the connection ended under it (the
/// client closed it, or `shutdown_grace` ran out in a drain), it logs the request: outcome
/// `cut`, status 499 (nginx's "client closed request"), the peer as client (what the guard
/// made of the request went with it), folded as denials are (a client can reset HTTP/2
/// streams as fast as it opens them). The request may have been charged, and passed on to
/// QuickBlox: without the line nothing would say so.
struct Unanswered<'a> {
    context: &'a WorkerContext,
    request_id: &'a http::HeaderValue,
    received: std::time::SystemTime,
    peer: SocketAddr,
    started: Instant,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        // Dropped by a panic in the service stack: a fault (the panic hook reports it on
        // standard error), not a request the client or a drain cut.
        if std::thread::panicking() {
            return;
        }
        let record = AccessRecord {
            request_id: self.request_id.to_str().unwrap_or_default(),
            received: self.received,
            peer: self.peer.ip().to_canonical(),
            status: AccessRecord::CUT_STATUS,
            duration: self.started.elapsed(),
            guarded: None,
            attribution: None,
            client: None,
            rejection: None,
            cut: true,
            preflight: false,
            refusal: None,
            upstream: None,
            uniform: None,
            include_email: false,
        };
        record.emit(&self.context.denials);
        self.context.state.metrics.cut(record.duration);
    }
}

/// The guarded service's answer, or the refusal of a request still waiting for QuickBlox or
/// Redis at `server.request_timeout`. An `OPTIONS` that is no CORS preflight skips the
/// CORS layer (which would answer it as one): the guard answers it as any other method.
async fn answer(
    context: &WorkerContext,
    mut request: Request<Incoming>,
    preflight: bool,
) -> (Response<GatewayBody>, Option<Refusal>) {
    let service = match &context.service {
        Either::Left(cors) if request.method() == http::Method::OPTIONS && !preflight => {
            Either::Right(cors.get_ref().clone())
        }
        service => service.clone(),
    };
    // A request with a body is watched (on a forwarded route, `ClientBody` says where it
    // got to): one whose time runs out while its body still arrives is the client's slow
    // body (408), not QuickBlox's lateness.
    let body = (!http_body::Body::is_end_stream(request.body())).then(|| {
        let watch = crate::upstream::BodyWatch::default();
        request.extensions_mut().insert(watch.clone());
        watch
    });
    let mut answer = std::pin::pin!(service.oneshot(request));
    // Most answers (every rejection) are ready at once: only arm the request timer for the
    // ones that wait on QuickBlox or Redis.
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(answer.as_mut().poll(cx))).await;
    let outcome = match first {
        std::task::Poll::Ready(result) => Ok(result),
        std::task::Poll::Pending => tokio::time::timeout(context.request_timeout, answer).await,
    };
    match outcome {
        Ok(Ok(response)) => (response, None),
        Ok(Err(never)) => match never {},
        Err(_) => {
            let refusal = match body.is_some_and(|body| body.waiting_on_client()) {
                true => Refusal::ClientBodyTimeout,
                false => Refusal::UpstreamTimeout,
            };
            (refusal.to_response().map(GuardBody::full), Some(refusal))
        }
    }
}
