//! [`ResetGuard`]: the middleware service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower::Service;

use crate::body::GuardBody;
use crate::check::{conclude, inspect, Decision, Inspection, Plan, Verdict};
use crate::future::ResponseFuture;
use crate::layer::{GuardState, Shared};
use crate::limit::ceil_secs;
use crate::rejection::{rate_limit_fields, uniform_success};

/// Checks reset requests and answers rejections itself; built by
/// [`ResetGuardLayer`](crate::ResetGuardLayer). See the [crate docs](crate) for an example.
#[derive(Debug, Clone)]
pub struct ResetGuard<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> ResetGuard<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        ResetGuard { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

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
        let state = self.shared.current.load();
        let min_latency = state.settings.min_latency;
        let floor = (!min_latency.is_zero()).then(|| Instant::now() + min_latency);
        #[cfg(feature = "redis")]
        let eager = self.shared.redis.is_none();
        #[cfg(not(feature = "redis"))]
        let eager = true;
        let plan = match inspect(&self.shared, &state, &request, eager) {
            Inspection::Answer(rejection) => return ResponseFuture::rejected(rejection),
            Inspection::PassThrough => {
                return ResponseFuture::passed_through(self.inner.call(request))
            }
            Inspection::Plan(plan) => plan,
        };
        #[cfg(feature = "redis")]
        if let (Some(store), Some(specs)) = (&self.shared.redis, &state.redis_specs) {
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
            response.extensions_mut().insert(rejection);
            response.extensions_mut().insert(*guarded);
            ResponseFuture::answered(response, floor)
        }
        Verdict::Rejected(rejection) => ResponseFuture::rejected(rejection),
    }
}
