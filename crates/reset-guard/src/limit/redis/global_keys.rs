//! Cluster mode: the `global` group spread over several keys (`global_keys`).
//!
//! One global key lives in one slot, so every request's last decision lands on the one
//! master that holds it, in a call of its own after the address's (a round trip, and a
//! script call's fixed cost in Redis, for about two requests in three). Spread over N keys,
//! each global quota becomes N quotas of 1/N of its rate and burst, one per key, and a
//! request charges the key for its address's part of the slot range: the slot range is cut
//! into N equal parts, and key `i` is named so that its own slot lies in part `i`. Where
//! the masters hold contiguous ranges of slots (as `redis-cli --cluster create` and
//! `--cluster rebalance` leave them), the address's key and its global key are then mostly
//! on one master, and decided in one call. The address's keyed hash picks the part, so
//! every replica picks the same key, and no client can aim its addresses at one part.

use super::batch::micros;
use crate::limit::{LimitGroup, Quota};

/// Slots in a Redis Cluster.
const SLOTS: u32 = 16384;

/// The keyed hashes that name the global group's keys, one per part of the slot range.
#[derive(Debug)]
pub(super) struct GlobalKeys {
    /// Per part, the hash whose key lies in it; one key (hash 0, the key of one exact
    /// global group) when the group is not spread.
    hashes: Box<[u64]>,
}

impl GlobalKeys {
    /// `count` keys (at least one), each found in its part: `slot_of` says where the key
    /// of a keyed hash lies.
    pub(super) fn new(count: u16, slot_of: impl Fn(u64) -> u16) -> Self {
        let count = u32::from(count.max(1));
        if count == 1 {
            return GlobalKeys {
                hashes: Box::new([0]),
            };
        }
        let mut hashes = vec![None; count as usize];
        let mut missing = hashes.len();
        // Candidates 0, 1, 2, ... each fill the part their slot lies in, if it has no key
        // yet: about N ln N tries (CRC16 spreads them evenly), a few thousand for 1,024
        // keys, once per reload.
        for hash in 0u64.. {
            let part = &mut hashes[part_of(slot_of(hash), count)];
            if part.is_none() {
                *part = Some(hash);
                missing -= 1;
                if missing == 0 {
                    break;
                }
            }
        }
        GlobalKeys {
            hashes: hashes.into_iter().map(Option::unwrap_or_default).collect(),
        }
    }

    /// How many keys the group is spread over.
    pub(super) fn count(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// The keyed hash of the global key a request whose address's key lies in
    /// `address_slot` charges.
    pub(super) fn for_address(&self, address_slot: u16) -> u64 {
        self.hashes[part_of(address_slot, self.hashes.len() as u32)]
    }
}

/// A global quota's numbers on each of `keys` keys, as the scripts have them: `keys` times
/// the interval (1/N of the rate) and the same capacity (1/N of the burst, in requests).
/// `keys` is at most the burst ([`spread_over`]), so each key holds at least one request.
pub(super) fn spread_micros(quota: &Quota, keys: u64) -> (u64, u64) {
    let (interval_us, capacity_us) = micros(quota);
    (interval_us.saturating_mul(keys.max(1)), capacity_us)
}

/// A quota's numbers on each of its group's keys: a global quota's spread over
/// `global_keys` keys, any other's whole.
pub(super) fn group_micros(group: LimitGroup, quota: &Quota, global_keys: u64) -> (u64, u64) {
    match group {
        LimitGroup::Global => spread_micros(quota, global_keys),
        _ => micros(quota),
    }
}

/// How many keys `global` quotas are spread over when `global_keys` asks for `keys`: as many,
/// unless a quota's burst is smaller (each key would hold less than one request, and a key
/// given one anyway would make the whole looser than the quota): then as many as the
/// smallest burst. The gateway's configuration and the layer's builder refuse that case; a
/// reload through [`crate::GuardHandle::update`] cannot, and gets this.
pub(crate) fn spread_over(keys: u16, quotas: &[Quota]) -> u16 {
    let smallest_burst = quotas.iter().map(|q| q.burst).min().unwrap_or(u32::MAX);
    u16::try_from(smallest_burst)
        .unwrap_or(u16::MAX)
        .min(keys)
        .max(1)
}

/// Which of `count` equal parts of the slot range `slot` lies in.
fn part_of(slot: u16, count: u32) -> usize {
    (u32::from(slot % SLOTS as u16) * count / SLOTS) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc_slot(hash: u64) -> u16 {
        let tag = format!("rg:global:{hash:016x}");
        crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % 16384
    }

    #[test]
    fn one_key_is_the_exact_global_key() {
        let keys = GlobalKeys::new(1, crc_slot);
        assert_eq!(keys.count(), 1);
        assert_eq!(keys.for_address(0), 0);
        assert_eq!(keys.for_address(16383), 0);
    }

    #[test]
    fn each_key_lies_in_the_part_of_the_slot_range_it_serves() {
        for count in [2u16, 3, 16, 1024] {
            let keys = GlobalKeys::new(count, crc_slot);
            assert_eq!(keys.count(), u64::from(count));
            let mut seen = std::collections::HashSet::new();
            for slot in 0..16384u16 {
                let hash = keys.for_address(slot);
                seen.insert(hash);
                let part = |s: u16| u32::from(s) * u32::from(count) / 16384;
                assert_eq!(
                    part(crc_slot(hash)),
                    part(slot),
                    "{count} keys, slot {slot}"
                );
            }
            assert_eq!(seen.len(), usize::from(count), "every key serves its part");
        }
    }

    #[test]
    fn three_keys_follow_the_ranges_cluster_create_gives_three_masters() {
        // redis-cli --cluster create: 0-5460, 5461-10922, 10923-16383.
        let keys = GlobalKeys::new(3, crc_slot);
        let master = |slot: u16| match slot {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        };
        let apart = (0..16384u16)
            .filter(|&slot| master(crc_slot(keys.for_address(slot))) != master(slot))
            .count();
        assert!(
            apart <= 2,
            "{apart} slots whose global key is on another master"
        );
    }

    #[test]
    fn each_key_holds_its_share_of_the_rate_and_the_burst() {
        let quota = Quota::new(100, std::time::Duration::from_secs(1), Some(50), false).unwrap();
        let (interval, capacity) = micros(&quota);
        let keys = GlobalKeys::new(5, crc_slot).count();
        assert_eq!(
            group_micros(LimitGroup::Global, &quota, keys),
            (5 * interval, capacity)
        );
        assert_eq!(
            group_micros(LimitGroup::PerEmail, &quota, keys),
            (interval, capacity)
        );
    }

    #[test]
    fn a_burst_below_the_keys_asked_for_spreads_over_as_many_keys_as_it() {
        let quota =
            |burst| Quota::new(100, std::time::Duration::from_secs(1), Some(burst), false).unwrap();
        assert_eq!(spread_over(64, &[quota(100), quota(50)]), 50);
        assert_eq!(spread_over(3, &[quota(100), quota(50)]), 3);
        assert_eq!(spread_over(3, &[]), 3, "no global quota");
        assert_eq!(spread_over(3, &[quota(1)]), 1);
        // Never looser: with a burst of 2 over 2 keys, each holds one request.
        let (interval, capacity) = spread_micros(&quota(2), 2);
        assert_eq!(capacity, interval);
    }
}
