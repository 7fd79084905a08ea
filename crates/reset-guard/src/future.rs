//! [`ResponseFuture`]: the inner service's answer, made uniform and padded to the
//! latency floor, or the guard's own answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Instant, Sleep};

use crate::body::GuardBody;
use crate::client_ip::ClientIp;
use crate::context::UpstreamStatus;
use crate::limit::Decision;
use crate::rejection::{set_uniform_headers, Rejection, RATELIMIT, RATELIMIT_POLICY};

pin_project! {
    /// Response future of [`ResetGuard`](crate::ResetGuard).
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
        uniform: bool,
        floor: Option<Instant>,
        rate_limit: Option<(HeaderValue, HeaderValue)>,
    }
}

/// A store's answer still on its way (Redis).
pub(crate) type PendingDecision = Pin<Box<dyn Future<Output = Decision> + Send>>;
/// What to do with it once it arrives.
pub(crate) type Continuation<F, B> = Box<dyn FnOnce(Decision) -> ResponseFuture<F, B> + Send>;

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Deciding { decision: PendingDecision, then: Option<Continuation<F, B>> },
        Inner { #[pin] future: F },
        // Boxed: a timer entry is large, and most futures never pad.
        Padding { sleep: Pin<Box<Sleep>>, response: Option<Response<GuardBody<B>>> },
        Ready { response: Option<Response<GuardBody<B>>> },
    }
}

impl<F, B> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Deciding { .. } => "waiting for the store",
            State::Inner { .. } => "waiting for the inner service",
            State::Padding { .. } => "padding to min_latency",
            State::Ready { .. } => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn guarded(
        future: F,
        uniform: bool,
        floor: Option<Instant>,
        rate_limit: Option<(HeaderValue, HeaderValue)>,
    ) -> Self {
        ResponseFuture {
            state: State::Inner { future },
            uniform,
            floor,
            rate_limit,
        }
    }

    /// Waits for the store, then continues as `then` says.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn deciding(decision: PendingDecision, then: Continuation<F, B>) -> Self {
        ResponseFuture {
            state: State::Deciding {
                decision,
                then: Some(then),
            },
            uniform: false,
            floor: None,
            rate_limit: None,
        }
    }

    pub(crate) fn passed_through(future: F) -> Self {
        Self::guarded(future, false, None, None)
    }

    /// The guard's own answer, with the rejection and whom it was for in its extensions
    /// for logs.
    pub(crate) fn rejected(rejection: Rejection, client: Option<ClientIp>) -> Self {
        let mut response = rejection.to_response();
        response.extensions_mut().insert(rejection);
        if let Some(client) = client {
            response.extensions_mut().insert(client);
        }
        Self::answered(response, None)
    }

    /// An answer the guard made, handed out no sooner than `floor`.
    pub(crate) fn answered(response: Response<Bytes>, floor: Option<Instant>) -> Self {
        ResponseFuture {
            state: after(response.map(GuardBody::full), floor),
            uniform: false,
            floor,
            rate_limit: None,
        }
    }
}

/// The state that hands out `response`, after the floor if one is set and not yet reached.
fn after<F, B>(response: Response<GuardBody<B>>, floor: Option<Instant>) -> State<F, B> {
    match floor {
        Some(deadline) if deadline > Instant::now() => State::Padding {
            sleep: Box::pin(sleep_until(deadline)),
            response: Some(response),
        },
        _ => State::Ready {
            response: Some(response),
        },
    }
}

/// Under `uniform`, 200, 401 and 404 leave as one identical bare 200, so neither status,
/// headers nor body tell whether the account exists; the true status rides along.
fn make_uniform<B>(response: Response<B>) -> Response<GuardBody<B>> {
    let status = response.status();
    if !crate::context::uniform_replaces(status) {
        return response.map(GuardBody::inner);
    }
    // Rewritten in place: the header map keeps its allocation.
    let (mut parts, _body) = response.into_parts();
    parts.status = StatusCode::OK;
    parts.headers.clear();
    set_uniform_headers(&mut parts.headers);
    parts.extensions.insert(UpstreamStatus(status));
    Response::from_parts(parts, GuardBody::full(Bytes::new()))
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<GuardBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                StateProj::Deciding { decision, then } => {
                    let decision = ready!(decision.as_mut().poll(cx));
                    let then = then.take().expect("future polled after completion");
                    self.set(then(decision));
                }
                StateProj::Inner { future } => {
                    let response = ready!(future.poll(cx))?;
                    let mut response = if *this.uniform {
                        make_uniform(response)
                    } else {
                        response.map(GuardBody::inner)
                    };
                    if let Some((policy, state)) = this.rate_limit.take() {
                        response.headers_mut().insert(RATELIMIT_POLICY, policy);
                        response.headers_mut().insert(RATELIMIT, state);
                    }
                    this.state.set(after(response, *this.floor));
                }
                StateProj::Padding { sleep, response } => {
                    ready!(sleep.as_mut().poll(cx));
                    let response = response.take().expect("future polled after completion");
                    return Poll::Ready(Ok(response));
                }
                StateProj::Ready { response } => {
                    let response = response.take().expect("future polled after completion");
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
}
