//! When an HTTP/2 connection is idle: no request open, none finished for a while.
//!
//! hyper closes an idle HTTP/1.1 connection at its header read timeout, but keeps an
//! HTTP/2 connection open for as long as its client answers pings, so a client could hold
//! `max_connections` slots with connections that never ask anything. The connection's
//! service counts its requests here, and the connection closes gracefully (GOAWAY: streams
//! already open finish) once it has been idle for `server.header_read_timeout`, as an
//! HTTP/1.1 connection would have been.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// One connection's requests: how many are open, and when the last one finished.
#[derive(Debug)]
pub(super) struct Activity {
    open: AtomicUsize,
    start: Instant,
    /// Milliseconds from `start` to the last request's end (or to `start`).
    last_done_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            open: AtomicUsize::new(0),
            start: Instant::now(),
            last_done_ms: AtomicU64::new(0),
        }
    }

    /// A request began; it ends when the returned guard is dropped.
    pub(super) fn begin(self: &std::sync::Arc<Self>) -> RequestOpen {
        self.open.fetch_add(1, Ordering::Relaxed);
        RequestOpen(self.clone())
    }

    /// Since when no request has been open; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        if self.open.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.start + Duration::from_millis(self.last_done_ms.load(Ordering::Relaxed)))
    }

    /// Completes once the connection has been idle for `limit`.
    pub(super) async fn idle_for(&self, limit: Duration) {
        loop {
            match self.idle_since() {
                Some(since) if since + limit <= Instant::now() => return,
                Some(since) => tokio::time::sleep_until(since + limit).await,
                None => tokio::time::sleep(limit).await,
            }
        }
    }
}

/// An open request of a connection; its end when dropped (answered, or abandoned).
pub(super) struct RequestOpen(std::sync::Arc<Activity>);

impl Drop for RequestOpen {
    fn drop(&mut self) {
        let activity = &self.0;
        let elapsed = u64::try_from(activity.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.last_done_ms.store(elapsed, Ordering::Relaxed);
        activity.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_request_and_never_while_one_is_open() {
        let activity = Arc::new(Activity::new());
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
}
