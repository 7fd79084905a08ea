//! A client's request body on its way to QuickBlox, watched so that a failure can be
//! blamed on the right side.
//!
//! When a forwarded request fails, hyper's client reports one error whether QuickBlox broke
//! the exchange or the client's body did (bad chunk framing, a body cut short before its
//! `Content-Length`). Counting the client's mistakes as `upstream_unavailable` would let any
//! anonymous client page whoever is on call, so the body itself records what happened to it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::idle_deadline::IdleDeadline;

const READING: u8 = 0;
const WAITING_ON_CLIENT: u8 = 1;
const FAILED: u8 = 2;
const ENDED: u8 = 3;
const STALLED: u8 = 4;

/// The client's body, passed through frame by frame. A body that sends nothing for `idle`
/// ends with an error, as nginx's `client_body_timeout` ends it: else a client that
/// started a body and never finished it would hold its connection, and the upstream
/// connection its body goes to, for as long as QuickBlox kept reading, the answer long
/// sent.
pub struct ClientBody {
    inner: Incoming,
    shared: Arc<Shared>,
    /// The bytes its declared length still holds back (none: no length declared).
    left: Option<u64>,
    deadline: IdleDeadline,
}

/// Where the body got to, and when it last passed a frame on.
struct Shared {
    state: AtomicU8,
    /// When the body was made.
    since: Instant,
    /// Its last frame, in microseconds from `since`.
    moved_us: AtomicU64,
}

/// What the forwarder reads afterwards: where the client's body got to.
#[derive(Clone)]
pub struct BodyWatch(Arc<Shared>);

/// Why a client's body ended early.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("the client's body: {0}")]
    Broken(#[from] hyper::Error),
    #[error("the client sent nothing of its body for {0:?}")]
    Stalled(Duration),
}

impl ClientBody {
    /// The body, failing once it has sent nothing for `idle`, watched through `watch` (made
    /// for it alone).
    pub fn new(inner: Incoming, idle: Duration, watch: &BodyWatch) -> ClientBody {
        // A body that is empty from the start is never polled.
        if inner.is_end_stream() {
            watch.0.state.store(ENDED, Ordering::Relaxed);
        }
        ClientBody {
            left: inner.size_hint().exact(),
            inner,
            shared: watch.0.clone(),
            deadline: IdleDeadline::new(idle),
        }
    }

    /// Where a frame just read leaves the body. It has ended at its last frame (hyper's
    /// client stops asking once a declared length is sent, or after trailers, so the end
    /// is seen there rather than waited for).
    fn after(&mut self, frame: &Frame<Bytes>) -> u8 {
        if let Some(data) = frame.data_ref() {
            self.left = self
                .left
                .map(|left| left.saturating_sub(data.remaining() as u64));
        }
        let last = frame.is_trailers() || self.left == Some(0) || self.inner.is_end_stream();
        match last {
            true => ENDED,
            false => READING,
        }
    }
}

impl Default for BodyWatch {
    fn default() -> Self {
        BodyWatch(Arc::new(Shared {
            state: AtomicU8::new(READING),
            since: Instant::now(),
            moved_us: AtomicU64::new(0),
        }))
    }
}

impl BodyWatch {
    fn state(&self) -> u8 {
        self.0.state.load(Ordering::Relaxed)
    }

    /// The client's body failed: broken framing, or the client went away mid-body.
    pub fn failed(&self) -> bool {
        self.state() == FAILED
    }

    /// The body was last found waiting for the client to send more, or stopped for having
    /// waited too long: a stall is theirs.
    pub fn waiting_on_client(&self) -> bool {
        matches!(self.state(), WAITING_ON_CLIENT | STALLED)
    }

    /// The body failed, or stopped for having sent nothing for too long: whatever then
    /// broke the exchange is the client's doing.
    pub fn broke_off(&self) -> bool {
        matches!(self.state(), FAILED | STALLED)
    }

    /// The body stopped for having sent nothing for too long.
    pub fn stalled(&self) -> bool {
        self.state() == STALLED
    }

    /// The body was read to its end: the connection it went over carries nothing more of
    /// it, and can take another request.
    pub fn ended(&self) -> bool {
        self.state() == ENDED
    }

    /// When the body last passed a frame on (when it was made, before its first).
    pub fn moved_at(&self) -> Instant {
        self.0.since + Duration::from_micros(self.0.moved_us.load(Ordering::Relaxed))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        let state = match &frame {
            Poll::Pending => WAITING_ON_CLIENT,
            Poll::Ready(Some(Err(_))) => FAILED,
            Poll::Ready(None) => ENDED,
            Poll::Ready(Some(Ok(frame))) => this.after(frame),
        };
        this.shared.state.store(state, Ordering::Relaxed);
        let Poll::Pending = frame else {
            let moved = this.shared.since.elapsed().as_micros();
            let moved = u64::try_from(moved).unwrap_or(u64::MAX);
            this.shared.moved_us.store(moved, Ordering::Relaxed);
            this.deadline.moved();
            return frame.map(|frame| frame.map(|frame| frame.map_err(ClientBodyError::from)));
        };
        match this.deadline.poll_elapsed(cx) {
            Poll::Ready(()) => {
                this.shared.state.store(STALLED, Ordering::Relaxed);
                Poll::Ready(Some(Err(ClientBodyError::Stalled(this.deadline.idle()))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body read whole before QuickBlox is asked: its bytes, then its trailers if it
/// had any. Empty for a reset, which sends no body.
#[derive(Default)]
pub struct WholeBody {
    data: Option<Bytes>,
    /// Boxed, as the streamed body is ([`super::UpstreamBody`]): a reset's request stays
    /// small.
    trailers: Option<Box<http::HeaderMap>>,
}

impl WholeBody {
    pub fn new(whole: http_body_util::Collected<Bytes>) -> Self {
        let trailers = whole.trailers().cloned().map(Box::new);
        let data = Some(whole.to_bytes()).filter(|data| !data.is_empty());
        WholeBody { data, trailers }
    }
}

impl Body for WholeBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = match (self.data.take(), self.trailers.take()) {
            (Some(data), trailers) => {
                self.trailers = trailers;
                Frame::data(data)
            }
            (None, Some(trailers)) => Frame::trailers(*trailers),
            (None, None) => return Poll::Ready(None),
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |data| data.len() as u64))
    }
}
