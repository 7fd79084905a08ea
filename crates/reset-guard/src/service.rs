//! [`ResetGuard`]: the middleware service.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower::Service;

use crate::body::GuardBody;
use crate::check::{conclude, inspect, Inspection, Plan, Verdict};
use crate::client_ip::ClientIp;
use crate::context::Attribution;
use crate::future::ResponseFuture;
use crate::limit::ceil_secs;
use crate::limit::Decision;
use crate::rejection::{rate_limit_fields, uniform_success, Rejection};
use crate::state::{GuardCore, GuardState};

/// Checks reset requests and answers rejections itself; built by
/// [`ResetGuardLayer`](crate::ResetGuardLayer). See the [crate docs](crate) for an example.
#[derive(Debug, Clone)]
pub struct ResetGuard<S> {
    inner: S,
    core: Arc<GuardCore>,
}

impl<S> ResetGuard<S> {
    pub(crate) fn new(inner: S, core: Arc<GuardCore>) -> Self {
        ResetGuard { inner, core }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// With Redis, a request may wait for the store's answer with the inner service taken
/// along, so the inner service must be `Clone + Send + 'static`. The bounds are the same
/// without the `redis` feature, so that a crate turning the feature on somewhere in a build
/// breaks no code that compiled without it (features must only add).
impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ResetGuard<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Body + Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<GuardBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let state = self.core.current.load();
        let min_latency = state.settings.min_latency;
        let floor = match min_latency.is_zero() {
            true => None,
            false => Instant::now().checked_add(min_latency),
        };
        #[cfg(feature = "redis")]
        let eager = self.core.redis.is_none();
        #[cfg(not(feature = "redis"))]
        let eager = true;
        let plan = match inspect(&self.core, &state, &request, eager) {
            Inspection::Answer(rejection) => {
                let client = ClientIp::of(&request, &state.settings.trusted_proxies);
                return ResponseFuture::rejected(rejection, client);
            }
            Inspection::PassThrough => {
                let mut request = request;
                crate::auth::remove_client_tokens(request.headers_mut(), &state.settings.clients);
                if let Some(client) = ClientIp::of(&request, &state.settings.trusted_proxies) {
                    request.extensions_mut().insert(client);
                }
                return ResponseFuture::passed_through(self.inner.call(request));
            }
            Inspection::MissingPeer => return missing_peer(&self.core, &state.settings.path),
            Inspection::Plan(plan) => plan,
        };
        #[cfg(feature = "redis")]
        if let (Some(store), Some(specs)) = (&self.core.redis, &state.redis_specs) {
            let decision = store.decide(specs, plan.charges());
            // The inner service was made ready for this request: take that one along and
            // leave a fresh clone for the next `poll_ready`.
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            let state = arc_swap::Guard::into_inner(state);
            return ResponseFuture::deciding(
                decision,
                Box::new(move |decision| {
                    finish(&mut inner, &state, request, plan, decision, floor)
                }),
            );
        }
        let decision = plan.eager_decision();
        finish(&mut self.inner, &state, request, plan, decision, floor)
    }
}

/// A guarded request without a peer address: counting it against a core bucket would
/// let any client lock out every other, so it is refused until the host is fixed.
fn missing_peer<F, B>(core: &GuardCore, path: &str) -> ResponseFuture<F, B> {
    if !core.missing_peer_logged.swap(true, Ordering::Relaxed) {
        tracing::error!(
            guarded_path = path,
            "reset-guard: a request on the guarded path carries no reset_guard::PeerAddr \
             extension, so its client cannot be told from any other; answering 500. Insert \
             PeerAddr(the TCP peer's SocketAddr) into the request extensions in a layer \
             outside the guard (axum: serve with into_make_service_with_connect_info::<SocketAddr>() \
             and copy ConnectInfo into PeerAddr, as in the crate's examples/axum.rs), or build \
             the layer with .without_peer_address() to let such requests share one per-IP bucket. \
             Logged once."
        );
    }
    // Tagged like the guard's other answers, so the host's logs tell it from its own 500s.
    ResponseFuture::rejected(Rejection::MissingPeerAddress, None)
}

/// Turns the store's decision into the answer: the inner service's, or the guard's own.
fn finish<S, ReqBody, ResBody>(
    inner: &mut S,
    state: &GuardState,
    mut request: Request<ReqBody>,
    plan: Plan,
    decision: Decision,
    floor: Option<Instant>,
) -> ResponseFuture<S::Future, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    let settings = &state.settings;
    match conclude(state, &mut request, plan, decision) {
        Verdict::Guarded(standing) => {
            let fields = standing
                .filter(|_| settings.limits.response_headers)
                .map(|s| rate_limit_fields(s.group, &s.quota, s.remaining, ceil_secs(s.reset)));
            ResponseFuture::guarded(inner.call(request), settings.uniform, floor, fields)
        }
        Verdict::Silenced(rejection, guarded) => {
            let mut response = uniform_success();
            let extensions = response.extensions_mut();
            extensions.insert(rejection);
            extensions.insert(Attribution::from(&*guarded));
            extensions.insert(*guarded);
            ResponseFuture::answered(response, floor)
        }
        Verdict::Rejected(rejection, attribution) => {
            let mut response = rejection.to_response();
            // The request's extension table, emptied, holds the answer's: a 429 under a
            // flood then allocates no table of its own.
            let extensions = response.extensions_mut();
            *extensions = std::mem::take(request.extensions_mut());
            extensions.clear();
            extensions.insert(rejection);
            extensions.insert(attribution);
            ResponseFuture::answered(response, None)
        }
    }
}
