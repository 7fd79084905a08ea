//! In-memory limiter state: one sharded map of key → TAT per quota, bounded in size.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::gcra::{evaluate, Cell};
use super::quota::Quota;

/// Shards per quota: enough that two cores rarely meet on one lock.
pub(crate) const SHARDS: usize = 64;

/// Keys are already keyed hashes: hashing them again would only cost time.
#[derive(Default)]
pub(crate) struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type TatMap = HashMap<u64, u64, BuildHasherDefault<PassThroughHasher>>;

/// The state of one quota: for each key, its theoretical arrival time.
pub(crate) struct QuotaState {
    pub(crate) quota: Quota,
    shards: Box<[Mutex<TatMap>]>,
    shard_capacity: usize,
    /// Keys dropped while still counting because the map was full.
    forced_evictions: AtomicU64,
}

pub(crate) fn shard_of(key: u64) -> usize {
    // The low bits pick the hashbrown bucket; the high ones pick the shard.
    (key >> 58) as usize % SHARDS
}

impl QuotaState {
    pub(crate) fn new(quota: Quota, max_keys: usize) -> Self {
        QuotaState {
            quota,
            shards: (0..SHARDS).map(|_| Mutex::new(TatMap::default())).collect(),
            shard_capacity: max_keys.div_ceil(SHARDS).max(1),
            forced_evictions: AtomicU64::new(0),
        }
    }

    pub(crate) fn lock(&self, shard: usize) -> MutexGuard<'_, TatMap> {
        // A panic while holding the lock cannot leave a TAT half-written: keep serving.
        self.shards[shard].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Evaluates `key` at `now` against a locked shard, without changing it.
    pub(crate) fn evaluate(&self, map: &TatMap, key: u64, now: u64) -> Cell {
        let tat = map.get(&key).copied().unwrap_or(0);
        evaluate(tat, now, self.quota.interval_ns, self.quota.capacity_ns)
    }

    /// Evaluates and, if admitted, stores the new TAT, with a single lookup.
    pub(crate) fn evaluate_and_commit(&self, map: &mut TatMap, key: u64, now: u64) -> Cell {
        if map.len() >= self.shard_capacity && !map.contains_key(&key) {
            self.make_room(map, now);
        }
        // A fresh entry holds 0, which equals no state; a denied key always existed
        // already (a fresh key is always admitted), so nothing is added on a denial.
        let tat = map.entry(key).or_insert(0);
        let cell = evaluate(*tat, now, self.quota.interval_ns, self.quota.capacity_ns);
        if let Cell::Admit { tat: new_tat, .. } = cell {
            *tat = new_tat;
        }
        cell
    }

    /// Stores a new TAT, making room first if the shard is full.
    pub(crate) fn commit(&self, map: &mut TatMap, key: u64, tat: u64, now: u64) {
        if map.len() >= self.shard_capacity && !map.contains_key(&key) {
            self.make_room(map, now);
        }
        map.insert(key, tat);
    }

    /// Idle keys go first (forgetting them changes no decision); if every key is
    /// still counting, the one closest to idle among a handful is dropped.
    fn make_room(&self, map: &mut TatMap, now: u64) {
        map.retain(|_, tat| *tat > now);
        if map.len() < self.shard_capacity {
            return;
        }
        if let Some(victim) = map
            .iter()
            .take(16)
            .min_by_key(|(_, tat)| **tat)
            .map(|(k, _)| *k)
        {
            map.remove(&victim);
            self.forced_evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets every idle key. Runs off the request path, one shard at a time.
    pub(crate) fn sweep(&self, now: u64) -> usize {
        let mut removed = 0;
        for shard in 0..SHARDS {
            let mut map = self.lock(shard);
            let before = map.len();
            map.retain(|_, tat| *tat > now);
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
            removed += before - map.len();
        }
        removed
    }

    /// Keys currently held.
    pub(crate) fn len(&self) -> usize {
        (0..SHARDS).map(|s| self.lock(s).len()).sum()
    }

    pub(crate) fn forced_evictions(&self) -> u64 {
        self.forced_evictions.load(Ordering::Relaxed)
    }
}
