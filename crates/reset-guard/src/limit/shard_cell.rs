//! How a quota's shards are held: behind a lock each where requests are decided on many
//! threads (the gateway), or in a plain cell for one thread replaying a log.
//!
//! Both run the same decisions on the same maps (memory.rs). The cell exists for speed
//! alone: every lock taken or released, and every compare-and-swap, is an atomic
//! instruction, which on x86 waits for every memory read before it. A replay reading
//! ahead the state of requests to come (to overlap their cache misses) gains nothing if
//! an atomic instruction sits between each of those reads.

use std::cell::{RefCell, RefMut};
use std::ops::{Deref, DerefMut};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A container for one shard.
pub(crate) trait ShardCell<T>: From<T> {
    /// Whether others may read the shard while one holds it to read: if so, a known key's
    /// state is changed by compare-and-swap under a shared hold.
    const SHARED: bool;
    type Read<'a>: Deref<Target = T>
    where
        Self: 'a;
    type Write<'a>: DerefMut<Target = T>
    where
        Self: 'a;
    fn read(&self) -> Self::Read<'_>;
    fn write(&self) -> Self::Write<'_>;
}

impl<T> ShardCell<T> for RwLock<T> {
    const SHARED: bool = true;
    type Read<'a>
        = RwLockReadGuard<'a, T>
    where
        T: 'a;
    type Write<'a>
        = RwLockWriteGuard<'a, T>
    where
        T: 'a;

    fn read(&self) -> RwLockReadGuard<'_, T> {
        // A panic while holding the lock cannot leave a TAT half-written: keep serving.
        RwLock::read(self).unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, T> {
        RwLock::write(self).unwrap_or_else(|e| e.into_inner())
    }
}

/// One thread's shard: a replay decides one request at a time, never two at once.
impl<T> ShardCell<T> for RefCell<T> {
    const SHARED: bool = false;
    type Read<'a>
        = RefMut<'a, T>
    where
        T: 'a;
    type Write<'a>
        = RefMut<'a, T>
    where
        T: 'a;

    fn read(&self) -> RefMut<'_, T> {
        self.borrow_mut()
    }

    fn write(&self) -> RefMut<'_, T> {
        self.borrow_mut()
    }
}
