//! What the limiter counts as it decides (denials, shadow denials, admissions near a
//! quota's limit), kept across reloads, and what it tells an observer of each decision.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{LimitGroup, Quota, MAX_QUOTAS_PER_GROUP};

/// What one quota of a group made of one request, for whoever watches decisions (the
/// near-limit counters, a replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaOutcome {
    /// Admitted and charged: `remaining` more requests fit now.
    Charged {
        /// Requests that still fit at once.
        remaining: u64,
    },
    /// It would not admit the request (a shadow quota only counts this).
    Denied,
    /// It would have admitted, but another quota of the group denied, so nothing was
    /// charged.
    Uncharged,
}

/// Whether an admission left less than a fifth of a quota's burst: the quota is close to
/// denying that key.
pub fn near_limit(quota: &Quota, remaining: u64) -> bool {
    remaining.saturating_mul(5) < u64::from(quota.burst)
}

/// Denials counted since start, kept across reloads.
#[derive(Debug, Default)]
pub struct LimitCounters {
    denied: [AtomicU64; 4],
    shadow_denied: [AtomicU64; 4],
    /// Per group and quota position: admissions that left less than a fifth of the burst.
    near_limit: [[AtomicU64; MAX_QUOTAS_PER_GROUP]; 4],
    /// Per group: keys dropped while still counting, shared with its quotas' states.
    evictions: [Arc<AtomicU64>; 4],
}

impl LimitCounters {
    /// Requests denied by an enforced quota of `group`.
    pub fn denied(&self, group: LimitGroup) -> u64 {
        self.denied[group.index()].load(Ordering::Relaxed)
    }

    /// Requests a shadow quota of `group` would have denied.
    pub fn shadow_denied(&self, group: LimitGroup) -> u64 {
        self.shadow_denied[group.index()].load(Ordering::Relaxed)
    }

    /// Admissions by the quota at `position` of `group` that left it near its limit
    /// ([`near_limit`]).
    pub fn near_limit(&self, group: LimitGroup, position: usize) -> u64 {
        self.near_limit[group.index()]
            .get(position)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Keys of `group` dropped while still counting.
    pub(crate) fn forced_evictions(&self, group: LimitGroup) -> u64 {
        self.evictions[group.index()].load(Ordering::Relaxed)
    }

    /// The counter the states of `group`'s quotas count their forced evictions in.
    pub(crate) fn evictions(&self, group: LimitGroup) -> Arc<AtomicU64> {
        self.evictions[group.index()].clone()
    }

    /// After a reload, each quota's near-limit count follows it to its new position in
    /// `group` (a changed quota starts from nothing): the counts are exported labelled by
    /// quota, and a reordering would otherwise move one quota's count onto another.
    pub(crate) fn carry_near_limit(&self, group: LimitGroup, before: &[Quota], after: &[Quota]) {
        let counters = &self.near_limit[group.index()];
        let old: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let origins = super::successors(before, after);
        for (position, counter) in counters.iter().enumerate() {
            // Each count with the quota that keeps its state; any other starts a series.
            let carried = match origins.get(position) {
                Some(super::Origin::Kept(from)) => old.get(*from).copied(),
                _ => None,
            };
            counter.store(carried.unwrap_or(0), Ordering::Relaxed);
        }
    }

    pub(crate) fn count_near_limit(&self, group: LimitGroup, position: usize) {
        if let Some(counter) = self.near_limit[group.index()].get(position) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_denied(&self, group: LimitGroup) {
        self.denied[group.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_shadow(&self, group: LimitGroup) {
        self.shadow_denied[group.index()].fetch_add(1, Ordering::Relaxed);
    }
}
