//! QuickBlox failing, in the log. Each failed request's cause is in its own access line
//! (`upstream_error`, beside its request id); this line says that QuickBlox is failing and
//! why, once at the first failure and then at most once a second with the count since
//! (as the Redis store's failures), so an outage costs a line a second, not a second line
//! per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::time::Instant;

/// Least time between two lines.
const INTERVAL: Duration = Duration::from_secs(1);

/// Why a forwarded request failed: the gateway's answer, and, when the failure was
/// QuickBlox's rather than the client's, what went wrong in a few words.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) refusal: crate::refusal::Refusal,
    /// Boxed: every forwarded request's future holds a `Failure`'s room.
    pub(super) cause: Option<Box<str>>,
}

impl Failure {
    /// QuickBlox's failure: logged and counted as such.
    pub(super) fn upstream(refusal: crate::refusal::Refusal, cause: impl Into<String>) -> Self {
        Failure {
            refusal,
            cause: Some(cause.into().into_boxed_str()),
        }
    }
}

impl From<crate::refusal::Refusal> for Failure {
    /// A refusal of the client's request: nothing QuickBlox did.
    fn from(refusal: crate::refusal::Refusal) -> Self {
        Failure {
            refusal,
            cause: None,
        }
    }
}

/// The failures of one upstream client, for its warning line. Every worker has a client
/// of its own; they share one [`Gate`], so the process writes at most a line a second.
pub(super) struct FailureLog {
    /// `host:port` of the upstream (never its path or credentials).
    upstream: String,
    gate: Arc<Gate>,
}

/// When the last line was written, and the failures since.
pub(super) struct Gate {
    started: Instant,
    /// Failures not yet in a line.
    unlogged: AtomicU64,
    /// When the last line was written, in milliseconds since `started` plus one (0: never).
    logged_at: AtomicU64,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            started: Instant::now(),
            unlogged: AtomicU64::new(0),
            logged_at: AtomicU64::new(0),
        })
    }
}

/// The process's gate, shared by every worker's client.
static PROCESS_GATE: LazyLock<Arc<Gate>> = LazyLock::new(Gate::new);

impl FailureLog {
    pub(super) fn new(upstream: String) -> Self {
        FailureLog::with_gate(upstream, PROCESS_GATE.clone())
    }

    fn with_gate(upstream: String, gate: Arc<Gate>) -> Self {
        FailureLog { upstream, gate }
    }

    /// Counts a failure of the request `request_id`; writes the line if it is due.
    pub(super) fn report(&self, cause: &str, request_id: Option<&str>) {
        let gate = &self.gate;
        gate.unlogged.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(gate.started.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = gate.logged_at.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= INTERVAL.as_millis() as u64;
        if due
            && gate
                .logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let failed = gate.unlogged.swap(0, Ordering::Relaxed);
            tracing::warn!(
                upstream = %self.upstream,
                upstream_error = cause,
                request_id,
                failed,
                "upstream request failed"
            );
        }
    }

    /// Failures counted but not yet in a line.
    #[cfg(test)]
    fn unlogged(&self) -> u64 {
        self.gate.unlogged.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_line_at_the_first_failure_then_at_most_one_a_second_with_the_count() {
        let log = FailureLog::with_gate("qb.example:443".to_owned(), Gate::new());
        log.report("connect refused", Some("a"));
        assert_eq!(log.unlogged(), 0, "the first is said at once");
        for _ in 0..5 {
            log.report("connect refused", Some("b"));
        }
        assert_eq!(log.unlogged(), 5, "held within the second");
        tokio::time::advance(Duration::from_millis(1000)).await;
        log.report("connect refused", Some("c"));
        assert_eq!(log.unlogged(), 0, "said with the six since");
    }

    /// Every client the gateway makes (one per worker, more at each reload) shares the
    /// process's gate.
    #[test]
    fn clients_share_the_process_gate() {
        let first = FailureLog::new("qb.example:443".to_owned());
        let second = FailureLog::new("qb.example:443".to_owned());
        assert!(Arc::ptr_eq(&first.gate, &second.gate));
    }

    /// Two workers' clients (one each) write one line between them within the second.
    #[tokio::test(start_paused = true)]
    async fn the_workers_clients_share_one_line_a_second() {
        let gate = Gate::new();
        let first = FailureLog::with_gate("qb.example:443".to_owned(), gate.clone());
        let second = FailureLog::with_gate("qb.example:443".to_owned(), gate);
        first.report("connect refused", Some("a"));
        second.report("connect refused", Some("b"));
        assert_eq!(
            second.unlogged(),
            1,
            "the second worker's failure waits for the next line"
        );
        tokio::time::advance(Duration::from_millis(1000)).await;
        second.report("connect refused", Some("c"));
        assert_eq!(first.unlogged(), 0);
    }
}
