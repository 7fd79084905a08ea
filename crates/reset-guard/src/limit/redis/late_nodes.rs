//! Cluster nodes that did not answer a call of one hash tag in time (`call_by_tag`: Redis
//! before 7, or a slot on the move), held back until a `PING` behind that call comes back.
//!
//! Redis runs every call it has received, however late: calls sent to a node that stalled
//! would all charge their requests once it resumes, though each was answered as `on_error`
//! says. So, as a master's own queue does (`run_master_batches`), nothing more is sent to
//! such a node until a `PING` on the connection the late call went on is answered (a node
//! answers a connection's commands in order, so the call has run by then).
//!
//! A call of one hash tag is a task of its own, and runs beside others: one may be sent
//! while another to the same node is still unanswered, in the moment between its requests
//! being answered as `on_error` says (their own deadline) and the call finding itself late
//! (the same deadline, a little later). So a node also counts as late while a call to it
//! that was sent before some request ran out of time is unanswered: the request says so
//! before it is answered. (A node that is merely slow, answering within the timeout, is
//! never held back.) The first call to find the node held back sends the `PING`, and the
//! others wait for its outcome; after one that failed, calls to the node fail at once (as
//! `on_error` says) for a moment rather than each sending another.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use super::batch::{why_not, Refusal};

/// The calls in flight and the nodes held back, by node URL.
pub(super) struct LateNodes {
    nodes: Mutex<HashMap<String, Node>>,
    next_call: AtomicU64,
    /// When a request last ran out of time waiting for its decision, in nanoseconds after
    /// `start` (0: none has).
    gave_up: AtomicU64,
    start: Instant,
}

impl Default for LateNodes {
    fn default() -> Self {
        LateNodes {
            nodes: Mutex::default(),
            next_call: AtomicU64::new(0),
            gave_up: AtomicU64::new(0),
            start: Instant::now(),
        }
    }
}

#[derive(Default)]
struct Node {
    /// Calls sent and not answered yet, by serial number (the oldest first): when each was
    /// sent, and on which connection.
    in_flight: BTreeMap<u64, (Instant, MultiplexedConnection)>,
    /// Set while the node is held back.
    late: Option<Late>,
}

/// A node held back: the connection its late call went on, and the `PING` on it (one at a
/// time; the last that failed, and why).
struct Late {
    connection: MultiplexedConnection,
    ping: Arc<tokio::sync::Mutex<Refusal>>,
}

/// A call in flight to a node. Answered in time, it goes; dropped without an answer (its time
/// ran out, or Redis's reply did not come within the connection's own timeout), it holds
/// the node back.
pub(super) struct InFlight<'a> {
    nodes: &'a LateNodes,
    url: String,
    serial: u64,
    answered: bool,
}

impl InFlight<'_> {
    /// The node answered (whatever it said): the call has run, or never will.
    pub(super) fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut nodes = self.nodes.lock();
        let Some(node) = nodes.get_mut(&self.url) else {
            return;
        };
        let call = node.in_flight.remove(&self.serial);
        if let (false, Some((_, connection))) = (self.answered, call) {
            node.late.get_or_insert_with(|| Late::on(connection));
        }
        if node.in_flight.is_empty() && node.late.is_none() {
            nodes.remove(&self.url);
        }
    }
}

impl Late {
    fn on(connection: MultiplexedConnection) -> Self {
        Late {
            connection,
            ping: Arc::default(),
        }
    }
}

impl LateNodes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Node>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the node at `url` back: a `PING` on `connection` got no answer in time.
    pub(super) fn hold(&self, url: &str, connection: MultiplexedConnection) {
        let mut nodes = self.lock();
        let node = nodes.entry(url.to_owned()).or_default();
        node.late.get_or_insert_with(|| Late::on(connection));
    }

    /// A request ran out of time waiting for its decision: the calls in flight now are late.
    pub(super) fn request_gave_up(&self) {
        self.gave_up
            .fetch_max(self.since_start(Instant::now()), Ordering::Relaxed);
    }

    fn since_start(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.start).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX).saturating_add(1)
    }

    /// A call sent to the node at `url` over `connection`: held until the node answers it.
    pub(super) fn sent(&self, url: &str, connection: MultiplexedConnection) -> InFlight<'_> {
        let serial = self.next_call.fetch_add(1, Ordering::Relaxed);
        let mut nodes = self.lock();
        let node = nodes.entry(url.to_owned()).or_default();
        node.in_flight.insert(serial, (Instant::now(), connection));
        InFlight {
            nodes: self,
            url: url.to_owned(),
            serial,
            answered: false,
        }
    }

    /// Whether a call may go to the node at `url` now: at once where it is not late (held
    /// back, or a call to it unanswered since before a request ran out of time); else once a
    /// `PING` behind its late call is answered within `wait`. `Err`: why not (no answer
    /// yet; the `PING` that failed a moment ago).
    pub(super) async fn clear(&self, url: &str, wait: Duration) -> Result<(), String> {
        let Some((mut connection, ping)) = self.late(url) else {
            return Ok(());
        };
        let mut refusal = ping.lock().await;
        // Answered meanwhile, by the caller before.
        if !self.still_held(url, &ping) {
            return Ok(());
        }
        if let Some(why) = refusal.recent() {
            return Err(why);
        }
        let ping_once = redis::cmd("PING");
        let pinged = tokio::time::timeout(wait, ping_once.query_async::<()>(&mut connection));
        match pinged.await {
            Ok(Ok(())) => {
                self.let_go(url, &ping);
                Ok(())
            }
            // The connection failed (the node restarted, or was cut off): nothing sent on it
            // is left to run. The next call connects anew.
            Ok(Err(error)) if !error.is_timeout() => {
                self.let_go(url, &ping);
                Ok(())
            }
            failed => {
                let why = why_not(failed, true);
                refusal.record(why.clone());
                Err(why)
            }
        }
    }

    /// The late call's connection and `PING` of the node at `url`, if it is late: held back,
    /// or with a call unanswered since before a request ran out of time (then held back from
    /// now).
    fn late(&self, url: &str) -> Option<(MultiplexedConnection, Arc<tokio::sync::Mutex<Refusal>>)> {
        let gave_up = self.gave_up.load(Ordering::Relaxed);
        let mut nodes = self.lock();
        let node = nodes.get_mut(url)?;
        if node.late.is_none() {
            // The oldest call in flight.
            let (sent, connection) = node.in_flight.values().next()?;
            if self.since_start(*sent) >= gave_up {
                return None;
            }
            node.late = Some(Late::on(connection.clone()));
        }
        let late = node.late.as_ref()?;
        Some((late.connection.clone(), late.ping.clone()))
    }

    fn still_held(&self, url: &str, ping: &Arc<tokio::sync::Mutex<Refusal>>) -> bool {
        let nodes = self.lock();
        let late = nodes.get(url).and_then(|node| node.late.as_ref());
        late.is_some_and(|late| Arc::ptr_eq(&late.ping, ping))
    }

    fn let_go(&self, url: &str, ping: &Arc<tokio::sync::Mutex<Refusal>>) {
        let mut nodes = self.lock();
        let Some(node) = nodes.get_mut(url) else {
            return;
        };
        if node
            .late
            .as_ref()
            .is_some_and(|late| Arc::ptr_eq(&late.ping, ping))
        {
            node.late = None;
            if node.in_flight.is_empty() {
                nodes.remove(url);
            }
        }
    }
}
