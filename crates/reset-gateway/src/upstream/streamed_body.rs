//! An answer streamed back from QuickBlox on a forwarded route.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::Incoming;

use super::pool::Lease;

/// An answer streamed from QuickBlox; its connection goes back to the pool once the
/// body has been read to its end (servers stop polling a body that says it has ended, so
/// that is checked after each frame, and when the body is dropped).
pub struct StreamedBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl StreamedBody {
    pub(super) fn new(body: Incoming, lease: Lease) -> Self {
        StreamedBody {
            body,
            lease: Some(lease),
        }
    }

    fn release_if_read(&mut self) {
        if http_body::Body::is_end_stream(&self.body) {
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
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if frame.is_ready() {
            self.release_if_read();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
