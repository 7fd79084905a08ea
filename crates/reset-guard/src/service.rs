//! [`ResetGuard`]: the middleware service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower::Service;

use crate::body::GuardBody;
use crate::check::{check, Verdict};
use crate::future::ResponseFuture;
use crate::layer::Shared;
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
        let state = self.shared.current.load();
        let settings = &state.settings;
        let floor =
            (!settings.min_latency.is_zero()).then(|| Instant::now() + settings.min_latency);
        match check(&self.shared, &state, &mut request) {
            Ok(Verdict::Guarded(standing)) => {
                let fields = standing
                    .filter(|_| settings.limits.response_headers)
                    .map(|s| {
                        rate_limit_fields(
                            s.group,
                            &s.quota,
                            s.remaining,
                            crate::limit::ceil_secs(s.reset),
                        )
                    });
                ResponseFuture::guarded(self.inner.call(request), settings.uniform, floor, fields)
            }
            Ok(Verdict::Silenced(rejection, guarded)) => {
                let mut response = uniform_success();
                response.extensions_mut().insert(rejection);
                response.extensions_mut().insert(*guarded);
                ResponseFuture::answered(response, floor)
            }
            Ok(Verdict::PassThrough) => ResponseFuture::passed_through(self.inner.call(request)),
            Err(rejection) => ResponseFuture::rejected(rejection),
        }
    }
}
