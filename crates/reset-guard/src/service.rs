//! [`ResetGuard`]: the middleware service.

use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower::Service;

use crate::body::GuardBody;
use crate::check::{check, Verdict};
use crate::future::ResponseFuture;
use crate::layer::GuardState;

/// Checks reset requests and answers rejections itself; built by
/// [`ResetGuardLayer`](crate::ResetGuardLayer). See the [crate docs](crate) for an example.
#[derive(Debug, Clone)]
pub struct ResetGuard<S> {
    inner: S,
    state: Arc<ArcSwap<GuardState>>,
}

impl<S> ResetGuard<S> {
    pub(crate) fn new(inner: S, state: Arc<ArcSwap<GuardState>>) -> Self {
        ResetGuard { inner, state }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ResetGuard<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body,
{
    type Response = Response<GuardBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        let state = self.state.load();
        match check(&state, &mut request) {
            Ok(Verdict::Guarded) => {
                let min_latency = state.settings.min_latency;
                let floor = (!min_latency.is_zero()).then(|| started + min_latency);
                ResponseFuture::guarded(self.inner.call(request), state.settings.uniform, floor)
            }
            Ok(Verdict::PassThrough) => ResponseFuture::passed_through(self.inner.call(request)),
            Err(rejection) => ResponseFuture::rejected(rejection, None),
        }
    }
}
