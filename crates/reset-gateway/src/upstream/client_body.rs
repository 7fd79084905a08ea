//! A client's request body on its way to QuickBlox, watched so that a failure can be
//! blamed on the right side.
//!
//! When a forwarded request fails, hyper's client reports one error whether QuickBlox broke
//! the exchange or the client's body did (bad chunk framing, a body cut short before its
//! `Content-Length`). Counting the client's mistakes as `upstream_unavailable` would let any
//! anonymous client page whoever is on call, so the body itself records what happened to it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

const READING: u8 = 0;
const WAITING_ON_CLIENT: u8 = 1;
const FAILED: u8 = 2;
const ENDED: u8 = 3;

/// The client's body, passed through frame by frame.
pub struct ClientBody {
    inner: Incoming,
    state: Arc<AtomicU8>,
}

/// What the forwarder reads afterwards: where the client's body got to.
#[derive(Clone)]
pub struct BodyWatch(Arc<AtomicU8>);

impl ClientBody {
    pub fn new(inner: Incoming) -> (ClientBody, BodyWatch) {
        let state = Arc::new(AtomicU8::new(READING));
        let watch = BodyWatch(state.clone());
        (ClientBody { inner, state }, watch)
    }
}

impl BodyWatch {
    /// The client's body failed: broken framing, or the client went away mid-body.
    pub fn failed(&self) -> bool {
        self.0.load(Ordering::Relaxed) == FAILED
    }

    /// The body was last found waiting for the client to send more: a stall is theirs.
    pub fn waiting_on_client(&self) -> bool {
        self.0.load(Ordering::Relaxed) == WAITING_ON_CLIENT
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        let state = match &frame {
            Poll::Pending => WAITING_ON_CLIENT,
            Poll::Ready(Some(Err(_))) => FAILED,
            Poll::Ready(None) => ENDED,
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => ENDED,
            Poll::Ready(Some(Ok(_))) => READING,
        };
        self.state.store(state, Ordering::Relaxed);
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
