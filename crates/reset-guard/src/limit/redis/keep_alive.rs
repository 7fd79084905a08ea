//! Redis connections kept alive while no request uses them, off the request path.
//!
//! A password-reset endpoint is often quiet for seconds at a time. A connection left idle
//! may have been closed by Redis (its `timeout`, `CLIENT KILL`) or have died with a
//! restarted server, and a script call written to a closed connection fails without
//! saying whether the script ran. Checking with a `PING` before the call finds out, but
//! costs a request a second round trip inside its `timeout`: with Redis 25 ms away and
//! the default 50 ms, every request after a pause failed. So a batching task that has sent
//! nothing for [`IDLE_CHECK`] sends a `PING` in the background (the connection is
//! multiplexed: a call written meanwhile is not held up by it), which also keeps Redis's
//! idle timeout from closing the connection at all; and a call is preceded by a `PING`
//! only when nothing has answered on its connection for [`SILENT_CHECK`] (the background
//! `PING`s failed or went unanswered: Redis restarted or is away).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::time::Instant;

/// How long a connection may go without anything sent over it before a `PING` is sent
/// in the background.
pub(super) const IDLE_CHECK: Duration = Duration::from_millis(500);

/// How long a connection may go without any answer before a call is preceded by a
/// `PING`: longer than [`IDLE_CHECK`] and a round trip, so that background `PING`s that
/// answer keep it from ever being needed.
pub(super) const SILENT_CHECK: Duration = Duration::from_millis(1000);

/// A `PING` over `connection`: answered, or why not. A user whose ACL leaves `PING` out is
/// answered `NOPERM` over a connection that works, which is all a `PING` is sent to find
/// out: counted as answered, rather than failing every request on a server that serves
/// them. A refused password (`NOAUTH`, `WRONGPASS`) is not: the connection is made anew.
pub(super) async fn ping(
    connection: &mut impl redis::aio::ConnectionLike,
) -> redis::RedisResult<()> {
    match redis::cmd("PING").query_async::<()>(connection).await {
        Err(error) if error.code() == Some("NOPERM") => Ok(()),
        answer => answer,
    }
}

/// When a connection last answered (a call or a `PING`), shared with the background
/// `PING`s sent over it.
#[derive(Debug)]
pub(super) struct Liveness {
    since: Instant,
    /// Nanoseconds after `since`, plus one; 0 while nothing has answered.
    answered_at: AtomicU64,
}

impl Liveness {
    /// A connection that has not answered yet: a new one, whose first call is preceded by
    /// a `PING` that makes it (given the time that takes, not the call's).
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Liveness {
            since: Instant::now(),
            answered_at: AtomicU64::new(0),
        })
    }

    /// The connection answered.
    pub(super) fn answered(&self) {
        let at = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.answered_at.store(at + 1, Ordering::Relaxed);
    }

    /// Whether nothing has answered for [`SILENT_CHECK`]: the next call is preceded by a
    /// `PING`.
    pub(super) fn silent(&self) -> bool {
        match self.answered_at.load(Ordering::Relaxed) {
            0 => true,
            at => {
                self.since
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(at - 1))
                    >= SILENT_CHECK
            }
        }
    }
}

/// When an idle connection is next due a `PING`, and sending it.
#[derive(Debug)]
pub(super) struct KeepAlive {
    /// When anything was last sent over the connection (a call, or a `PING`).
    last_sent: Instant,
    pub(super) liveness: Arc<Liveness>,
    /// Fires when a `PING` is next due, if nothing is sent before.
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl KeepAlive {
    pub(super) fn new() -> Self {
        let last_sent = Instant::now();
        KeepAlive {
            last_sent,
            liveness: Liveness::new(),
            idle: Box::pin(tokio::time::sleep_until(last_sent + IDLE_CHECK)),
        }
    }

    /// The next job of a batching task's `queue` (none once every sender is gone); while
    /// none comes, `connection`, if the task has one, is kept alive.
    pub(super) async fn next_job<J>(
        &mut self,
        queue: &mut tokio::sync::mpsc::Receiver<J>,
        connection: Option<&ConnectionManager>,
        timeout: Duration,
    ) -> Option<J> {
        loop {
            tokio::select! {
                biased;
                job = queue.recv() => return job,
                () = &mut self.idle => {
                    match connection {
                        Some(connection) => self.ping_if_due(connection, timeout),
                        // No connection to keep (the next call makes one): not due again
                        // until the next interval, rather than at once, forever.
                        None => self.sent(),
                    }
                    let due = self.due();
                    self.idle.as_mut().reset(due);
                }
            }
        }
    }

    /// When the connection is next due a `PING` if nothing is sent before then.
    pub(super) fn due(&self) -> Instant {
        self.last_sent + IDLE_CHECK
    }

    /// Something is being sent over the connection.
    pub(super) fn sent(&mut self) {
        self.last_sent = Instant::now();
    }

    /// A `PING` over `connection` in the background, if it is due (its answer, within
    /// `timeout`, recorded); the connection manager makes a new connection after one that
    /// fails.
    pub(super) fn ping_if_due(&mut self, connection: &ConnectionManager, timeout: Duration) {
        if Instant::now() < self.due() {
            return;
        }
        self.sent();
        let mut connection = connection.clone();
        let liveness = self.liveness.clone();
        tokio::spawn(async move {
            let pinged = tokio::time::timeout(timeout, ping(&mut connection));
            if let Ok(Ok(())) = pinged.await {
                liveness.answered();
            }
        });
    }
}
