//! An answer streamed back from QuickBlox on a forwarded route.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;

use super::client_body::BodyWatch;
use super::failures::FailureLog;
use super::idle_deadline::IdleDeadline;
use super::pool::Lease;

/// An answer streamed from QuickBlox; its connection goes back to the pool once the
/// body has been read to its end (servers stop polling a body that says it has ended, so
/// that is checked after each frame, and when the body is dropped), and the client's body
/// sent on it has ended too: an answer may come before the request's body is all sent
/// (a server refusing it early), and a connection still sending one would keep the next
/// request waiting behind it. Such a connection is closed instead. A body that sends
/// nothing for `idle` (QuickBlox sent a head, then stalled) ends with an error, which
/// closes the client's connection (resets its stream over HTTP/2), as nginx's
/// `proxy_read_timeout` does: else the client's connection, and its place under
/// `max_connections`, would be held for as long as QuickBlox's socket stayed open.
pub struct StreamedBody {
    body: Incoming,
    lease: Option<Lease>,
    /// Where the client's body, sent on the same connection, got to.
    sent: BodyWatch,
    deadline: IdleDeadline,
    /// Boxed: every answer's body type, a reset's and a 429's included, is as large as
    /// this one's (its request id and the client's body's watch made every answer's moves
    /// dearer, benches/README.md).
    watch: Box<AnswerWatch>,
}

/// Where a body that fails after its head (logged already) is reported, and as which
/// request: the client sees only its connection closed.
pub(super) struct AnswerWatch {
    pub(super) failures: Arc<FailureLog>,
    pub(super) request_id: Option<http::HeaderValue>,
}

impl AnswerWatch {
    fn failed(&self, error: &StreamedBodyError) {
        let cause = match error {
            StreamedBodyError::Upstream(error) => {
                let error: &(dyn std::error::Error + 'static) = error;
                let chain = std::iter::successors(Some(error), |&e| e.source());
                format!("answer body: {}", super::cause::upstream_error(chain))
            }
            StreamedBodyError::Stalled(idle) => format!("answer body: nothing for {idle:?}"),
        };
        let id = self.request_id.as_ref().and_then(|id| id.to_str().ok());
        self.failures.report(&cause, id);
    }
}

/// Why a streamed answer ended early.
#[derive(Debug, thiserror::Error)]
pub enum StreamedBodyError {
    #[error("QuickBlox's answer: {0}")]
    Upstream(#[from] hyper::Error),
    #[error("QuickBlox sent nothing of its answer's body for {0:?}")]
    Stalled(Duration),
}

impl StreamedBody {
    pub(super) fn new(
        body: Incoming,
        (lease, sent): (Lease, BodyWatch),
        idle: Duration,
        watch: AnswerWatch,
    ) -> Self {
        StreamedBody {
            body,
            lease: Some(lease),
            sent,
            deadline: IdleDeadline::new(idle),
            watch: Box::new(watch),
        }
    }

    fn release_if_read(&mut self) {
        if http_body::Body::is_end_stream(&self.body) && self.sent.ended() {
            if let Some(lease) = self.lease.take() {
                lease.release();
            }
        }
    }
}

impl Drop for StreamedBody {
    fn drop(&mut self) {
        self.release_if_read();
    }
}

impl http_body::Body for StreamedBody {
    type Data = Bytes;
    type Error = StreamedBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, StreamedBodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.release_if_read();
                this.deadline.moved();
                let frame = frame.map(|frame| frame.map_err(StreamedBodyError::from));
                // An answer cut short because the client's own body broke off (the
                // connection it went over is then closed) is not QuickBlox's failure.
                if let Some(Err(error)) = &frame {
                    if !this.sent.broke_off() {
                        this.watch.failed(error);
                    }
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                match this.deadline.poll_elapsed(cx) {
                    // The connection is not released: what it would carry next is unknown.
                    Poll::Ready(()) => {
                        let error = StreamedBodyError::Stalled(this.deadline.idle());
                        this.watch.failed(&error);
                        Poll::Ready(Some(Err(error)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
