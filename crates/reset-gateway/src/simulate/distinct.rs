//! Distinct limit keys per group, counted exactly over a whole replay (the limiter itself
//! forgets idle keys, so it cannot tell).
//!
//! Keys arrive at random from sets of hundreds of thousands: each insert is a cache miss.
//! They are queued and inserted in batches, where the processor overlaps the misses of
//! one insert with the next instead of waiting on each in turn between two decisions.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;

use reset_guard::internals::PassThroughHasher;

/// Limit keys are keyed hashes already: hashing them again would only cost time.
type KeySet = HashSet<u64, BuildHasherDefault<PassThroughHasher>>;

/// Keys queued before they are inserted.
const BATCH: usize = 256;

/// The keys each of the four groups was charged on.
#[derive(Debug, Default)]
pub(super) struct DistinctKeys {
    seen: [KeySet; 4],
    /// Charged keys not inserted yet: (group, key).
    queued: Vec<(usize, u64)>,
    /// Each group's last key queued: repeats (the one global key, a few clients) are
    /// dropped here.
    last: [Option<u64>; 4],
}

impl DistinctKeys {
    /// Notes a charge of group `group` (0 to 3) on `key`.
    pub(super) fn add(&mut self, group: usize, key: u64) {
        if self.last[group] == Some(key) {
            return;
        }
        self.last[group] = Some(key);
        self.queued.push((group, key));
        if self.queued.len() >= BATCH {
            for (group, key) in self.queued.drain(..) {
                self.seen[group].insert(key);
            }
        }
    }

    /// Distinct keys group `group` was charged on.
    pub(super) fn count(&self, group: usize) -> usize {
        let set = &self.seen[group];
        let mut unseen: Vec<u64> = self
            .queued
            .iter()
            .filter(|(g, key)| *g == group && !set.contains(key))
            .map(|(_, key)| *key)
            .collect();
        unseen.sort_unstable();
        unseen.dedup();
        set.len() + unseen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_counts_once_per_group_queued_or_inserted() {
        let mut keys = DistinctKeys::default();
        // More than a batch, every key twice and not in a row, and one key in two groups.
        for round in 0..2 {
            for key in 0..1000u64 {
                keys.add(2, key.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                keys.add(3, 0);
                if round == 0 {
                    keys.add(0, 7);
                }
            }
            keys.add(0, 7);
        }
        assert_eq!(keys.count(2), 1000);
        assert_eq!(keys.count(3), 1);
        assert_eq!(keys.count(0), 1);
        assert_eq!(keys.count(1), 0);
    }
}
