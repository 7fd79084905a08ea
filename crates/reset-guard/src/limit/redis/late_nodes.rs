//! Cluster nodes that did not answer a call of one hash tag in time (`call_by_tag`: Redis
//! before 7, or a slot on the move), held back until a `PING` behind that call comes back.
//!
//! Redis runs every call it has received, however late: calls sent to a node that stalled
//! would all charge their requests once it resumes, though each was answered as `on_error`
//! says. So, as a master's own queue does (`run_master_batches`), nothing more is sent to
//! such a node until a `PING` on the connection the late call went on is answered (a node
//! answers a connection's commands in order, so the call has run by then).
//!
//! A call is late when the first of its requests is about to stop waiting: it gives up just
//! before them, so the node is held back before any of them is answered, and so before any
//! call their clients send next. A node that is slow but answers in time is never held
//! back. Calls of one hash tag run side by side, though: those sent while the first call
//! of a stall was still in time may count too.
//!
//! The first call to find a node held back starts the `PING`, in a task of its own given
//! the time making a connection may take (it waits behind the late call), so that its
//! outcome stands though that call stops waiting first; the other calls wait for the same
//! outcome. After a `PING` that failed, calls to the node fail at once (as `on_error`
//! says) for a moment, rather than each starting another.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use tokio::time::Instant;

use super::batch::{why_not, Refusal, LATE_CALL};

/// The calls in flight and the nodes held back, by node URL.
#[derive(Default)]
pub(super) struct LateNodes {
    nodes: Mutex<HashMap<String, Node>>,
    next_call: AtomicU64,
}

#[derive(Default)]
struct Node {
    /// Calls sent and not answered yet, by serial number: on which connection.
    in_flight: BTreeMap<u64, MultiplexedConnection>,
    /// Set while the node is held back.
    late: Option<Late>,
}

/// A node held back: the connection its late call went on, and the `PING` on it (one at a
/// time; the last that failed, and why).
struct Late {
    connection: MultiplexedConnection,
    ping: Arc<AsyncMutex<Refusal>>,
}

impl Late {
    fn on(connection: MultiplexedConnection) -> Self {
        Late {
            connection,
            ping: Arc::default(),
        }
    }
}

/// Most nodes held back at once (more than a cluster has masters, and the nodes a slot
/// moves to): beyond that a node is not held back. Each is let go once a `PING` behind its
/// late call is answered, or its connection fails.
const MOST_HELD: usize = 64;

/// A call in flight to a node. Answered in time, it goes; dropped without an answer (its
/// time ran out, or the connection's own timeout did), it holds the node back.
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
        let held = nodes.values().filter(|node| node.late.is_some()).count();
        let Some(node) = nodes.get_mut(&self.url) else {
            return;
        };
        let call = node.in_flight.remove(&self.serial);
        if let (false, Some(connection)) = (self.answered, call) {
            if node.late.is_none() && held < MOST_HELD {
                node.late = Some(Late::on(connection));
            }
        }
        if node.in_flight.is_empty() && node.late.is_none() {
            nodes.remove(&self.url);
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
        let held = nodes.values().filter(|node| node.late.is_some()).count();
        if held < MOST_HELD || nodes.contains_key(url) {
            let node = nodes.entry(url.to_owned()).or_default();
            node.late.get_or_insert_with(|| Late::on(connection));
        }
    }

    /// A call sent to the node at `url` over `connection`: held until the node answers it.
    pub(super) fn sent(&self, url: &str, connection: MultiplexedConnection) -> InFlight<'_> {
        let serial = self.next_call.fetch_add(1, Ordering::Relaxed);
        let mut nodes = self.lock();
        let node = nodes.entry(url.to_owned()).or_default();
        node.in_flight.insert(serial, connection);
        InFlight {
            nodes: self,
            url: url.to_owned(),
            serial,
            answered: false,
        }
    }

    /// Whether a call may go to the node at `url` now: `Ok(true)` where it is not held
    /// back; `Ok(false)` where it was, and a `PING` behind its late call (given `ping_wait`)
    /// was answered by `until`, so that the next call may go. `Err`: why not (no answer
    /// yet; the `PING` that failed a moment ago).
    pub(super) async fn clear(
        self: &Arc<Self>,
        url: &str,
        until: Instant,
        ping_wait: Duration,
    ) -> Result<bool, String> {
        let Some((connection, ping)) = self.held(url) else {
            return Ok(true);
        };
        let turn = tokio::time::timeout_at(until, ping.clone().lock_owned()).await;
        let refusal = turn.map_err(|_| LATE_CALL.to_owned())?;
        // Answered meanwhile, by the PING before.
        if !self.still_held(url, &ping) {
            return Ok(false);
        }
        if let Some(why) = refusal.recent() {
            return Err(why);
        }
        let pinging =
            tokio::spawn(
                self.clone()
                    .ping(url.to_owned(), connection, refusal, ping_wait),
            );
        match tokio::time::timeout_at(until, pinging).await {
            Ok(Ok(outcome)) => outcome.map(|()| false),
            Ok(Err(_)) => Err("the PING's task stopped".to_owned()),
            Err(_) => Err(LATE_CALL.to_owned()),
        }
    }

    /// A `PING` on a held node's late connection, within `wait`: answered, the node is let
    /// go; else the failure is kept in `refusal` for the calls after.
    async fn ping(
        self: Arc<Self>,
        url: String,
        mut connection: MultiplexedConnection,
        mut refusal: OwnedMutexGuard<Refusal>,
        wait: Duration,
    ) -> Result<(), String> {
        let pinged = tokio::time::timeout(wait, super::keep_alive::ping(&mut connection)).await;
        match pinged {
            Ok(Ok(())) => {
                self.let_go(&url);
                Ok(())
            }
            // The connection failed (the node restarted, or was cut off): nothing sent on
            // it is left to run. The next call connects anew.
            Ok(Err(error)) if !error.is_timeout() => {
                self.let_go(&url);
                Ok(())
            }
            failed => {
                let why = why_not(failed, true);
                refusal.record(why.clone());
                Err(why)
            }
        }
    }

    /// The late call's connection and `PING` of the node at `url`, if it is held back.
    fn held(&self, url: &str) -> Option<(MultiplexedConnection, Arc<AsyncMutex<Refusal>>)> {
        let nodes = self.lock();
        let late = nodes.get(url)?.late.as_ref()?;
        Some((late.connection.clone(), late.ping.clone()))
    }

    fn still_held(&self, url: &str, ping: &Arc<AsyncMutex<Refusal>>) -> bool {
        let nodes = self.lock();
        let late = nodes.get(url).and_then(|node| node.late.as_ref());
        late.is_some_and(|late| Arc::ptr_eq(&late.ping, ping))
    }

    /// Lets go of the nodes held back that are not among `urls` (the masters of a slot map
    /// read again) and have no call in flight: addresses no call goes to any more (a master
    /// replaced by its replica) would otherwise stay held, and fill the table.
    pub(super) fn keep_only(&self, urls: &[String]) {
        self.lock()
            .retain(|url, node| !node.in_flight.is_empty() || urls.contains(url));
    }

    fn let_go(&self, url: &str) {
        let mut nodes = self.lock();
        let Some(node) = nodes.get_mut(url) else {
            return;
        };
        node.late = None;
        if node.in_flight.is_empty() {
            nodes.remove(url);
        }
    }
}
