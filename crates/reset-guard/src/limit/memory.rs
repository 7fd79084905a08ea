//! In-memory limiter state: one sharded map of key → TAT per quota, bounded in size.
//!
//! A known key is decided under its shard's shared lock with a compare-and-swap on its
//! TAT, so requests on one hot key (a flood from one address) never queue behind each
//! other, and a thread preempted mid-decision holds up no one. Only a new key, a group of
//! several quotas and the sweeper take a shard exclusively.
//!
//! Idle keys are forgotten by the sweeper, and also as new keys arrive: a shard drops its
//! idle keys once it has taken in a quarter of its size in new ones, so a quota whose
//! keys go idle quickly keeps a small table (as nginx's zones expire entries as they
//! go), and neither growth nor a full shard ever costs more than O(1) per new key.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::gcra::{evaluate, Cell};
use super::quota::Quota;
use super::shard_cell::ShardCell;

/// Shards per quota: enough that two cores rarely meet on one lock.
pub(crate) const SHARDS: usize = 64;

/// Keys are already keyed hashes: hashing them again would only cost time.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThroughHasher(u64);

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

pub(crate) type TatMap = HashMap<u64, AtomicU64, BuildHasherDefault<PassThroughHasher>>;

/// One shard: its keys, and how many arrived since it last dropped its idle ones.
#[derive(Default)]
pub(crate) struct Shard {
    pub(crate) tats: TatMap,
    new_since_reclaim: usize,
}

impl Shard {
    /// Drops every idle key (forgetting one changes no decision); returns how many.
    fn forget_idle(&mut self, now: u64) -> usize {
        let before = self.tats.len();
        self.tats.retain(|_, tat| *tat.get_mut() > now);
        before - self.tats.len()
    }
}

/// Fewest new keys between two reclaiming scans of a small shard.
const RECLAIM_MIN: usize = 16;

/// The state of one quota: for each key, its theoretical arrival time.
pub(crate) struct QuotaState<C = RwLock<Shard>> {
    pub(crate) quota: Quota,
    shards: Box<[C]>,
    shard_capacity: usize,
    /// Keys dropped while still counting because the map was full: the group's counter,
    /// shared by the states of its quotas before and after a reload, so it never goes back.
    forced_evictions: Arc<AtomicU64>,
}

pub(crate) fn shard_of(key: u64) -> usize {
    // hashbrown picks the bucket from the low bits and the tag it compares sixteen slots
    // at a time from the top seven: the shard comes from bits in between. From the top
    // six, every key of a shard would carry one of two tags, and a lookup would compare
    // half a group of keys instead of about one.
    (key >> 48) as usize % SHARDS
}

impl<C: ShardCell<Shard>> QuotaState<C> {
    #[cfg(test)]
    pub(crate) fn new(quota: Quota, max_keys: usize) -> Self {
        Self::counting_evictions(quota, max_keys, Arc::default())
    }

    /// A state whose forced evictions are counted in `evictions`.
    pub(crate) fn counting_evictions(
        quota: Quota,
        max_keys: usize,
        evictions: Arc<AtomicU64>,
    ) -> Self {
        QuotaState {
            quota,
            shards: (0..SHARDS).map(|_| C::from(Shard::default())).collect(),
            shard_capacity: max_keys.div_ceil(SHARDS).max(1),
            forced_evictions: evictions,
        }
    }

    /// A state for `quota` that takes over every counting key of `previous` (the quota it
    /// replaces in a reload), each charged with as many requests as it had spent there, at
    /// most a full burst: tightening a quota (3 an hour to 1) refuses at once an address
    /// that has already had its new quota, and loosening one keeps what was spent, where a
    /// fresh state would hand every address a new burst on each reload.
    pub(crate) fn carried_from(
        previous: &QuotaState<C>,
        quota: Quota,
        max_keys: usize,
        evictions: Arc<AtomicU64>,
        now: u64,
    ) -> Self {
        let state = Self::counting_evictions(quota, max_keys, evictions);
        for shard in 0..SHARDS {
            let old = previous.read(shard);
            let mut new = state.write(shard);
            for (key, tat) in &old.tats {
                let backlog = tat.load(Ordering::Relaxed).saturating_sub(now);
                if backlog == 0 {
                    continue;
                }
                // The requests the backlog stands for, at the new quota's interval.
                let lead = u128::from(backlog) * u128::from(quota.interval_ns)
                    / u128::from(previous.quota.interval_ns);
                let carried = u64::try_from(lead)
                    .unwrap_or(u64::MAX)
                    .min(quota.capacity_ns);
                new.tats
                    .insert(*key, AtomicU64::new(now.saturating_add(carried)));
            }
        }
        state
    }

    /// The shard, exclusively: for new keys, groups of several quotas and sweeping.
    pub(crate) fn write(&self, shard: usize) -> C::Write<'_> {
        self.shards[shard].write()
    }

    fn read(&self, shard: usize) -> C::Read<'_> {
        self.shards[shard].read()
    }

    /// Evaluates `key` at `now` against an exclusively held shard, without changing it.
    pub(crate) fn evaluate(&self, shard: &Shard, key: u64, now: u64) -> Cell {
        let tat = shard
            .tats
            .get(&key)
            .map_or(0, |tat| tat.load(Ordering::Relaxed));
        evaluate(tat, now, self.quota.interval_ns, self.quota.capacity_ns)
    }

    /// The TAT held for `key` (0 if none), changing nothing: a replay reads the state of
    /// requests to come so that their cache misses overlap, ahead of deciding them.
    pub(crate) fn peek(&self, key: u64) -> u64 {
        self.read(shard_of(key))
            .tats
            .get(&key)
            .map_or(0, |tat| tat.load(Ordering::Relaxed))
    }

    /// Evaluates `key` and, if admitted, stores the new TAT: the whole decision for a
    /// group of one quota.
    pub(crate) fn decide(&self, key: u64, now: u64) -> Cell {
        let shard = shard_of(key);
        if !C::SHARED {
            // Nobody else can be stepping the TAT: the evaluation and commit a group of
            // several quotas makes, with no compare-and-swap.
            let mut shard = self.write(shard);
            let cell = self.evaluate(&shard, key, now);
            if let Cell::Admit { tat, .. } = cell {
                self.commit(&mut shard, key, tat, now);
            }
            return cell;
        }
        if let Some(tat) = self.read(shard).tats.get(&key) {
            return self.decide_on(tat, now);
        }
        let mut shard = self.write(shard);
        if !shard.tats.contains_key(&key) {
            self.make_room(&mut shard, now);
        }
        // A fresh entry holds 0, which equals no state; a denied key always existed
        // already (a fresh key is always admitted), so nothing is added on a denial.
        let tat = shard.tats.entry(key).or_default();
        self.decide_on(tat, now)
    }

    /// One GCRA step on a TAT others may be stepping at the same time: retried until
    /// the TAT it stores follows from the TAT it read. A denial changes nothing.
    fn decide_on(&self, tat: &AtomicU64, now: u64) -> Cell {
        let mut current = tat.load(Ordering::Relaxed);
        loop {
            let cell = evaluate(current, now, self.quota.interval_ns, self.quota.capacity_ns);
            let Cell::Admit { tat: next, .. } = cell else {
                return cell;
            };
            match tat.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return cell,
                Err(actual) => current = actual,
            }
        }
    }

    /// Stores a new TAT, making room first for a new key.
    pub(crate) fn commit(&self, shard: &mut Shard, key: u64, tat: u64, now: u64) {
        match shard.tats.get_mut(&key) {
            Some(stored) => *stored.get_mut() = tat,
            None => {
                self.make_room(shard, now);
                shard.tats.insert(key, AtomicU64::new(tat));
            }
        }
    }

    /// Before a new key goes in: idle keys are dropped once a quarter of the shard's size
    /// has arrived since the last scan (forgetting them changes no decision), and if the
    /// shard is still at its bound, the key closest to idle among a handful goes.
    fn make_room(&self, shard: &mut Shard, now: u64) {
        shard.new_since_reclaim += 1;
        if shard.new_since_reclaim >= (shard.tats.len() / 4).max(RECLAIM_MIN) {
            shard.new_since_reclaim = 0;
            shard.forget_idle(now);
        }
        if shard.tats.len() < self.shard_capacity {
            return;
        }
        if let Some((victim, tat)) = shard
            .tats
            .iter()
            .take(16)
            .map(|(key, tat)| (*key, tat.load(Ordering::Relaxed)))
            .min_by_key(|(_, tat)| *tat)
        {
            shard.tats.remove(&victim);
            if tat > now {
                self.forced_evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Forgets every idle key. Runs off the request path, one shard at a time.
    pub(crate) fn sweep(&self, now: u64) -> usize {
        let mut removed = 0;
        for shard in 0..SHARDS {
            let mut shard = self.write(shard);
            removed += shard.forget_idle(now);
            let map = &mut shard.tats;
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
        }
        removed
    }

    /// Keys currently held.
    pub(crate) fn len(&self) -> usize {
        (0..SHARDS).map(|s| self.read(s).tats.len()).sum()
    }

    #[cfg(test)]
    pub(crate) fn forced_evictions(&self) -> u64 {
        self.forced_evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(requests: u32, per_secs: u64) -> Quota {
        Quota::new(
            requests,
            std::time::Duration::from_secs(per_secs),
            None,
            false,
        )
        .unwrap()
    }

    /// How many of `ask`'s decisions were admissions, summed over four threads running it
    /// at once.
    fn admitted_by_four_threads(ask: impl Fn() -> usize + Sync) -> usize {
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4).map(|_| scope.spawn(&ask)).collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        })
    }

    #[test]
    fn threads_racing_on_one_key_never_share_a_slot() {
        // 4 threads ask 500 times each at one instant for a key allowed 1000 an hour:
        // exactly 1000 are admitted however the compare-and-swaps interleave.
        let state = QuotaState::<RwLock<Shard>>::new(quota(1000, 3600), 1_000);
        let now = 1_000_000_000_000;
        let admitted = admitted_by_four_threads(|| {
            (0..500)
                .filter(|_| matches!(state.decide(42, now), Cell::Admit { .. }))
                .count()
        });
        assert_eq!(admitted, 1000);
        assert!(matches!(state.decide(42, now), Cell::Deny { .. }));
    }

    #[test]
    fn new_keys_arriving_together_each_get_their_own_state() {
        // Threads inserting the same fresh keys at once: each key admits exactly its
        // burst, whichever thread created its entry.
        let state = QuotaState::<RwLock<Shard>>::new(quota(3, 3600), 10_000);
        let now = 1_000_000_000_000;
        let admitted = admitted_by_four_threads(|| {
            (0..100u64)
                .flat_map(|key| [key, key])
                .filter(|&key| matches!(state.decide(key << 32 | key, now), Cell::Admit { .. }))
                .count()
        });
        assert_eq!(admitted, 100 * 3);
        assert_eq!(state.len(), 100);
    }

    #[test]
    fn keys_that_go_idle_at_once_never_pile_up_between_sweeps() {
        // A generous quota (1 per second, each key asked once, two seconds apart): with no
        // sweep at all, each shard still holds only the few keys since its last scan.
        let state = QuotaState::<RwLock<Shard>>::new(quota(1, 1), 1_000_000);
        let second = 1_000_000_000;
        for i in 0..100_000u64 {
            let key = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            assert!(matches!(
                state.decide(key, (i + 1) * 2 * second),
                Cell::Admit { .. }
            ));
        }
        assert!(
            state.len() <= SHARDS * RECLAIM_MIN,
            "{} keys held",
            state.len()
        );
        assert_eq!(state.forced_evictions(), 0);
    }

    #[test]
    fn shards_leave_hashbrowns_bucket_and_tag_bits_alone() {
        // Keys that differ only in the top seven bits (hashbrown's tag) or the low
        // 32 (the bucket) share a shard; the bits in between spread keys over all shards.
        let key = 0x0123_4567_89ab_cdefu64;
        for other in [key ^ (0x7f << 57), key ^ 0xffff_ffff] {
            assert_eq!(shard_of(other), shard_of(key));
        }
        let shards: std::collections::HashSet<usize> =
            (0..SHARDS as u64).map(|i| shard_of(i << 48)).collect();
        assert_eq!(shards.len(), SHARDS);
    }

    #[test]
    fn a_full_shard_of_live_keys_stays_at_its_bound() {
        // 64 keys allowed in all (one per shard); every key stays live for an hour: each
        // new key displaces a live one (counted), and the bound holds.
        let state = QuotaState::<RwLock<Shard>>::new(quota(1, 3600), SHARDS);
        let now = 1_000_000_000_000;
        for i in 0..10_000u64 {
            let key = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            assert!(matches!(state.decide(key, now), Cell::Admit { .. }));
        }
        assert_eq!(state.len(), SHARDS);
        assert_eq!(state.forced_evictions(), 10_000 - SHARDS as u64);
    }
}
