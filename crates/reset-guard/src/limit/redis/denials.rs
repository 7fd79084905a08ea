//! The local cache of denials: an address (IP, client, email) refused by Redis is refused
//! here until its denial resets, so a flood against one key does not reach Redis.
//!
//! Bounded at [`LIMIT`] denials. A full cache sweeps out the denials that have run out at
//! most once a second, and remembers no new one until a sweep makes room: a sweep walks
//! every entry under the lock every request takes, and a flood of new addresses, each
//! refused, once made every new denial pay a walk of 100,000 entries that freed nothing
//! (denials live as long as their `Retry-After`, up to hours), halving the gateway's
//! requests per second. A denial not remembered is decided by Redis again, as before it
//! was cached.

use std::collections::HashMap;

use super::{Denial, LimitGroup};

/// Most denials remembered.
pub(super) const LIMIT: usize = 100_000;
/// Least time between two sweeps of a full cache.
const FULL_SWEEP_INTERVAL_NS: u64 = 1_000_000_000;

/// Denials by group and keyed hash, each with the time (the store's clock) it runs out
/// and how many reloads the store had seen when it was cached.
#[derive(Default)]
pub(super) struct DenialCache {
    entries: HashMap<(LimitGroup, u64), (u64, Denial, u64)>,
    /// When a full cache may be swept again.
    next_full_sweep: u64,
}

impl DenialCache {
    /// Remembers `denial` of `key` until `until`, cached after `reload` reloads, if there
    /// is room (see the module's docs).
    pub(super) fn remember(
        &mut self,
        key: (LimitGroup, u64),
        until: u64,
        denial: Denial,
        now: u64,
        reload: u64,
    ) {
        if self.entries.len() >= LIMIT && !self.entries.contains_key(&key) {
            if now < self.next_full_sweep {
                return;
            }
            self.next_full_sweep = now.saturating_add(FULL_SWEEP_INTERVAL_NS);
            self.sweep(now);
            if self.entries.len() >= LIMIT {
                return;
            }
        }
        self.entries.insert(key, (until, denial, reload));
    }

    /// The denial of `key` and when it runs out.
    pub(super) fn get(&self, key: &(LimitGroup, u64)) -> Option<(u64, &Denial)> {
        self.entries
            .get(key)
            .map(|(until, denial, _)| (*until, denial))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keeps the denials `keep` says to keep (given each one's group, and the reload
    /// count it was cached at).
    pub(super) fn retain(&mut self, mut keep: impl FnMut(LimitGroup, &Denial, u64) -> bool) {
        self.entries
            .retain(|(group, _), (_, denial, reload)| keep(*group, denial, *reload));
    }

    /// Drops the denials that have run out by `now`.
    pub(super) fn sweep(&mut self, now: u64) {
        self.entries.retain(|_, (until, ..)| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::limit::Quota;

    fn denial() -> Denial {
        Denial {
            group: LimitGroup::PerEmail,
            quota: Quota::new(1, Duration::from_secs(3600), None, false).unwrap(),
            retry_after: Duration::from_secs(10),
        }
    }

    const SECOND: u64 = 1_000_000_000;

    /// A full cache remembers no new denial until a sweep makes room, and sweeps at most
    /// once a second: what ran out by then is dropped, and the room it leaves is used.
    #[test]
    fn a_full_cache_sweeps_at_most_once_a_second() {
        let mut cache = DenialCache::default();
        let key = |i: usize| (LimitGroup::PerEmail, i as u64);
        // Half run out at 1.5 s, half at an hour.
        for i in 0..LIMIT {
            let until = if i % 2 == 0 {
                3 * SECOND / 2
            } else {
                3600 * SECOND
            };
            cache.remember(key(i), until, denial(), 0, 0);
        }
        assert_eq!(cache.entries.len(), LIMIT);
        // Full at 1 s, nothing run out: the sweep frees nothing.
        cache.remember(key(LIMIT), 3600 * SECOND, denial(), SECOND, 0);
        assert!(cache.get(&key(LIMIT)).is_none());
        // At 1.7 s half have run out, but the last sweep was less than a second ago.
        cache.remember(key(LIMIT + 1), 3600 * SECOND, denial(), 17 * SECOND / 10, 0);
        assert_eq!(cache.entries.len(), LIMIT, "no sweep within the second");
        assert!(cache.get(&key(LIMIT + 1)).is_none());
        // A second after the last sweep: what ran out is dropped.
        cache.remember(key(LIMIT + 2), 3600 * SECOND, denial(), 2 * SECOND, 0);
        assert_eq!(cache.entries.len(), LIMIT / 2 + 1);
        assert!(cache.get(&key(LIMIT + 2)).is_some());
        // A denial already held is updated, full or not.
        cache.remember(key(1), 7 * SECOND, denial(), 2 * SECOND, 0);
        assert_eq!(cache.get(&key(1)).map(|(until, _)| until), Some(7 * SECOND));
    }
}
