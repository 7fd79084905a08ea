//! What an HTTP/2 connection's answers are doing: none open and none for a while (idle),
//! or one waiting for the client to take more (stalled).
//!
//! hyper closes an idle HTTP/1.1 connection at its header read timeout, but keeps an
//! HTTP/2 connection open for as long as its client answers pings, so a client could hold
//! `max_connections` slots with connections that never ask anything. Each request counts
//! as open until the last piece of its answer's body is handed over (a streamed answer is
//! still an open request), and the connection closes gracefully (GOAWAY: streams already
//! open finish) once none has been open for `server.header_read_timeout`, as an HTTP/1.1
//! one would have been.
//!
//! A client that stops reading an HTTP/2 answer never stalls the socket (send_timeout.rs
//! sees nothing): it stops granting flow-control window, and hyper stops asking the body
//! for more. An answer that has waited `server.request_timeout` to be asked again means a
//! client that stopped taking it (each answer on its own clock: one stream read slowly
//! does not keep another, never read, and its upstream exchange alive); the connection is
//! dropped. Bodies are handed over in pieces of at most 16 KiB, so progress is seen about
//! once a DATA frame.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::handler::GatewayBody;

/// One connection's answers.
#[derive(Debug)]
pub(super) struct Activity {
    start: Instant,
    /// Requests open: from the call until the answer's body is done or dropped.
    open: AtomicUsize,
    /// Milliseconds from `start` to the last request's end (or to `start`).
    last_done_ms: AtomicU64,
    /// The answers that handed over a piece and have not been asked for more since: each
    /// request's number and the milliseconds from `start` to when it began waiting (at
    /// most one per open stream, 32).
    waiting: Mutex<Vec<(u64, u64)>>,
    /// Numbers requests.
    requests: AtomicU64,
}

impl Activity {
    /// A connection's answers, idle from `start` until its first request.
    pub(super) fn since(start: Instant) -> Self {
        Activity {
            start,
            open: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
            waiting: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: &AtomicU64) -> Instant {
        self.start + Duration::from_millis(ms.load(Ordering::Relaxed))
    }

    /// A request began; it ends when the returned guard is dropped.
    pub(super) fn begin(self: &Arc<Self>) -> RequestOpen {
        self.open.fetch_add(1, Ordering::Relaxed);
        let number = self.requests.fetch_add(1, Ordering::Relaxed);
        RequestOpen(self.clone(), number)
    }

    /// Completes once no request has been open for `limit`.
    pub(super) async fn idle_for(&self, limit: Duration) {
        loop {
            if self.open.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(limit).await;
                continue;
            }
            let since = self.at(&self.last_done_ms);
            if since + limit <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(since + limit).await;
        }
    }

    /// Completes once some answer has waited `limit` for the client to take more (each
    /// answer on its own clock: one stream read slowly does not keep another the client
    /// never reads, and its upstream exchange, alive).
    pub(super) async fn client_stalled_for(&self, limit: Duration) {
        loop {
            let oldest = self.waiting.lock().unwrap().iter().map(|w| w.1).min();
            let Some(oldest) = oldest else {
                tokio::time::sleep(limit).await;
                continue;
            };
            let since = self.start + Duration::from_millis(oldest);
            if since + limit <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(since + limit).await;
        }
    }
}

/// An open request of a connection (and its number); its end when dropped (answered, or
/// abandoned).
pub(super) struct RequestOpen(Arc<Activity>, u64);

impl RequestOpen {
    fn awaiting_client(&self) {
        let activity = &self.0;
        let since = activity.now_ms();
        activity.waiting.lock().unwrap().push((self.1, since));
    }

    fn asked_again(&self) {
        let mut waiting = self.0.waiting.lock().unwrap();
        if let Some(at) = waiting.iter().position(|w| w.0 == self.1) {
            waiting.swap_remove(at);
        }
    }
}

impl Drop for RequestOpen {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .last_done_ms
            .store(activity.now_ms(), Ordering::Relaxed);
        activity.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Largest piece of an answer handed to HTTP/2 at once: hyper asks for more only when a
/// piece has gone out, so a bigger one (an upstream read can be hundreds of kilobytes)
/// would make a slow but steady reader look stalled, and its last piece would outlive
/// the request.
const PIECE: usize = 16 * 1024;

pin_project_lite::pin_project! {
    /// An answer's body; over HTTP/2, the request stays open in its connection's
    /// [`Activity`] until the body is done, and the body is handed over in pieces of at
    /// most [`PIECE`].
    pub(super) struct TrackedBody {
        #[pin]
        inner: GatewayBody,
        open: Option<RequestOpen>,
        awaiting: bool,
        // What is left of the last data frame.
        rest: Bytes,
    }

    impl PinnedDrop for TrackedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let (true, Some(open)) = (*this.awaiting, this.open.as_ref()) {
                open.asked_again();
            }
        }
    }
}

impl TrackedBody {
    pub(super) fn new(inner: GatewayBody, open: Option<RequestOpen>) -> Self {
        TrackedBody {
            inner,
            open,
            awaiting: false,
            rest: Bytes::new(),
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = <GatewayBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let Some(open) = this.open.as_ref() else {
            return this.inner.poll_frame(cx);
        };
        if std::mem::take(this.awaiting) {
            open.asked_again();
        }
        let polled = if this.rest.is_empty() {
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) if data.len() > PIECE => {
                        *this.rest = data.split_off(PIECE);
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                other => other,
            }
        } else {
            let take = this.rest.len().min(PIECE);
            Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(take)))))
        };
        let ended = this.rest.is_empty() && this.inner.is_end_stream();
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && !ended {
            open.awaiting_client();
            *this.awaiting = true;
        }
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || ended {
            // Done: the request is over (the guard goes; a later poll finds none).
            if *this.awaiting {
                open.asked_again();
                *this.awaiting = false;
            }
            *this.open = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_request_and_never_while_one_is_open() {
        let activity = Arc::new(Activity::since(Instant::now()));
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let open = activity.begin();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(Duration::from_secs(5)).await }
        });
        // Open for 20s: not idle, however long.
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!idle.is_finished());
        drop(open);
        idle.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(28));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_not_asked_for_more_is_stalled_once_it_has_waited_the_limit() {
        let activity = Arc::new(Activity::since(Instant::now()));
        let start = Instant::now();
        let open = activity.begin();
        let stalled = tokio::spawn({
            let activity = activity.clone();
            async move { activity.client_stalled_for(Duration::from_secs(30)).await }
        });
        // Asked again within the limit, twice: not stalled.
        for _ in 0..2 {
            open.awaiting_client();
            tokio::time::sleep(Duration::from_secs(20)).await;
            open.asked_again();
        }
        assert!(!stalled.is_finished());
        open.awaiting_client();
        stalled.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(70));
    }

    #[tokio::test(start_paused = true)]
    async fn each_answer_waits_on_its_own_clock() {
        let activity = Arc::new(Activity::since(Instant::now()));
        let start = Instant::now();
        let (read, never_read) = (activity.begin(), activity.begin());
        let stalled = tokio::spawn({
            let activity = activity.clone();
            async move { activity.client_stalled_for(Duration::from_secs(30)).await }
        });
        // Two streams each take a piece every 20s, out of step: no stall.
        for _ in 0..3 {
            read.awaiting_client();
            tokio::time::sleep(Duration::from_secs(10)).await;
            never_read.awaiting_client();
            tokio::time::sleep(Duration::from_secs(10)).await;
            read.asked_again();
            tokio::time::sleep(Duration::from_secs(10)).await;
            never_read.asked_again();
        }
        assert!(!stalled.is_finished());
        // Then one is never asked again while the other goes on: stalled 30s on.
        never_read.awaiting_client();
        for _ in 0..3 {
            read.awaiting_client();
            tokio::time::sleep(Duration::from_secs(10)).await;
            read.asked_again();
        }
        stalled.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(90 + 30));
    }
}
