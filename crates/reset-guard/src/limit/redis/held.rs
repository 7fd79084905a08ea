//! Who holds each worker thread's batching queue: the store, not the thread. The thread
//! keeps a weak handle to find its queue by, and beside it a [`Release`] that lets go of the
//! store's hold when the thread's entry goes (replaced by a new queue, or the thread exits).
//! So a queue's task and its Redis connection end when either the store is dropped (an
//! application that builds its layer again) or the thread exits (a blocking pool's thread
//! that retires, the threads `block_in_place` hands a worker's core to), whichever comes
//! first. Held by the thread alone, a dropped store's queues lived until the thread exited;
//! held by the store alone, every exited thread's queue lived as long as the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// A store's holds on its threads' queues, each by the serial number of the hold.
pub(super) type Held<T> = Arc<Mutex<Vec<(u64, T)>>>;

static NEXT_HOLD: AtomicU64 = AtomicU64::new(0);

/// Kept in a thread's list beside its weak handle to the queue: dropped with the entry, it
/// lets go of the store's hold.
pub(super) struct Release<T> {
    held: Weak<Mutex<Vec<(u64, T)>>>,
    serial: u64,
}

impl<T> Drop for Release<T> {
    fn drop(&mut self) {
        let Some(held) = self.held.upgrade() else {
            return;
        };
        let gone = {
            let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
            let at = held.iter().position(|(serial, _)| *serial == self.serial);
            at.map(|at| held.swap_remove(at))
        };
        // Outside the lock: the queue's end closes its channel.
        drop(gone);
    }
}

/// Holds `queue` in `held` until the returned [`Release`] is dropped.
pub(super) fn hold<T>(held: &Held<T>, queue: T) -> Release<T> {
    let serial = NEXT_HOLD.fetch_add(1, Ordering::Relaxed);
    held.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((serial, queue));
    Release {
        held: Arc::downgrade(held),
        serial,
    }
}
