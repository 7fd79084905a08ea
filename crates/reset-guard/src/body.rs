//! The response body of the guard: the inner service's body, or one the guard wrote.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    #[allow(missing_docs)] // fields are private in spirit: build with `inner` or `full`
    /// Either the inner service's body or a complete body the guard made itself.
    #[project = GuardBodyProj]
    pub enum GuardBody<B> {
        /// Passed through from the inner service.
        Inner {
            #[pin]
            body: B,
        },
        /// Written by the guard (a rejection or a uniform answer).
        Full {
            data: Option<Bytes>,
        },
    }
}

impl<B> GuardBody<B> {
    /// Wraps the inner service's body.
    pub fn inner(body: B) -> Self {
        GuardBody::Inner { body }
    }

    /// A complete body.
    pub fn full(data: Bytes) -> Self {
        GuardBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for GuardBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuardBody::Inner { body } => f.debug_tuple("GuardBody::Inner").field(body).finish(),
            GuardBody::Full { data } => f.debug_tuple("GuardBody::Full").field(data).finish(),
        }
    }
}

/// An empty body (what a CORS preflight answer carries).
impl<B> Default for GuardBody<B> {
    fn default() -> Self {
        GuardBody::Full { data: None }
    }
}

impl<B> Body for GuardBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            GuardBodyProj::Inner { body } => body.poll_frame(cx),
            GuardBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GuardBody::Inner { body } => body.is_end_stream(),
            GuardBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GuardBody::Inner { body } => body.size_hint(),
            GuardBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
