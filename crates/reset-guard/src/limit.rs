//! Rate limits (ARCHITECTURE.md, "The limiter"): four groups of GCRA quotas, keyed by
//! client IP, client, canonical email and nothing (global), held in memory.
//!
//! A group's quotas are decided together: a request is charged to none of them unless
//! every enforced quota admits it. Groups are checked in request order (IP, client,
//! email, global), so a request denied by one group is never charged by a later one.

mod clock;
mod counters;
mod gcra;
mod key;
mod memory;
mod quota;
#[cfg(feature = "redis")]
mod redis;
mod shard_cell;

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;

#[cfg(feature = "redis")]
pub use self::redis::{InvalidRedisSettings, OnError, RedisSettings, MAX_GLOBAL_KEYS};
#[cfg(feature = "redis")]
pub(crate) use self::redis::{QuotaMove, RedisSpecs, RedisStore};
#[cfg(test)]
pub(crate) use clock::ManualClock;
pub(crate) use clock::{Clock, MonotonicClock, SetClock};
pub use counters::{near_limit, LimitCounters, QuotaOutcome};
pub(crate) use key::Domain;
pub use key::KeyHasher;
pub use quota::Quota;

use gcra::Cell;
pub use memory::PassThroughHasher;
pub(crate) use memory::Shard;
use memory::{shard_of, QuotaState};
use shard_cell::ShardCell;

/// Most quotas one group may hold.
pub const MAX_QUOTAS_PER_GROUP: usize = 4;

/// The four limit groups, in the order a request meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitGroup {
    /// Keyed by client IP (masked to a prefix).
    PerIp,
    /// Keyed by client id.
    PerClient,
    /// Keyed by canonical email, hashed.
    PerEmail,
    /// One key for everything.
    Global,
}

impl LimitGroup {
    /// All groups, in order.
    pub const ALL: [LimitGroup; 4] = [
        LimitGroup::PerIp,
        LimitGroup::PerClient,
        LimitGroup::PerEmail,
        LimitGroup::Global,
    ];

    /// The name used in YAML, headers, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            LimitGroup::PerIp => "per_ip",
            LimitGroup::PerClient => "per_client",
            LimitGroup::PerEmail => "per_email",
            LimitGroup::Global => "global",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Checked `guard.limits`.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitSettings {
    pub(crate) groups: [Vec<Quota>; 4],
    pub(crate) ipv4_prefix: u8,
    pub(crate) ipv6_prefix: u8,
    pub(crate) exempt: Vec<IpNet>,
    pub(crate) response_headers: bool,
}

impl LimitSettings {
    /// Settings of these groups' quotas (in `LimitGroup::ALL` order) and the defaults
    /// otherwise, for tests of the Redis store.
    #[cfg(all(test, feature = "redis"))]
    pub(crate) fn of_groups(groups: [Vec<Quota>; 4]) -> Self {
        LimitSettings {
            groups,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            exempt: Vec::new(),
            response_headers: false,
        }
    }

    /// The quotas of one group.
    pub fn quotas(&self, group: LimitGroup) -> &[Quota] {
        &self.groups[group.index()]
    }

    /// Whether `ip` skips the per-IP limit.
    pub(crate) fn is_exempt(&self, ip: IpAddr) -> bool {
        self.exempt.iter().any(|net| net.contains(&ip))
    }

    /// The per-IP key: the address masked to the configured prefix, so one host
    /// rotating through its IPv6 /64 is still one client.
    pub(crate) fn ip_key(&self, ip: IpAddr, hasher: &KeyHasher) -> u64 {
        match ip {
            IpAddr::V4(v4) => {
                let masked = u32::from(v4) & prefix_mask32(self.ipv4_prefix);
                hasher.hash(key::Domain::Ip, &masked.to_be_bytes())
            }
            IpAddr::V6(v6) => {
                let masked = u128::from(v6) & prefix_mask128(self.ipv6_prefix);
                hasher.hash(key::Domain::Ip, &masked.to_be_bytes())
            }
        }
    }
}

fn prefix_mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn prefix_mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// What the store said about a plan's charges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Every group admitted; the tightest standing among them.
    Admitted(Option<Standing>),
    /// The group at this index of the charges denied; the ones before it were charged.
    Denied(usize, Denial),
    /// The store could not be asked and `on_error: deny` is set.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Unavailable,
    /// The store could not be asked and `on_error: allow` let the request through, its
    /// limits unapplied.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Unlimited,
}

/// Why a request was limited: the quota that denied it and when it may retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denial {
    /// The group.
    pub group: LimitGroup,
    /// The quota that denied.
    pub quota: Quota,
    /// Time until a request would be admitted.
    pub retry_after: Duration,
}

impl Denial {
    /// Whole seconds for `Retry-After`, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        ceil_secs(self.retry_after).max(1)
    }
}

/// How much room the tightest admitting quota has left, for `RateLimit` on allowed answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// The group.
    pub group: LimitGroup,
    /// The quota.
    pub quota: Quota,
    /// Requests that still fit now.
    pub remaining: u64,
    /// Time until the quota is whole again.
    pub reset: Duration,
}

impl Standing {
    /// The tighter of two standings.
    pub(crate) fn tighter(self, other: Option<Standing>) -> Standing {
        match other {
            Some(other) if other.remaining < self.remaining => other,
            _ => self,
        }
    }
}

pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Store settings that belong to the deployment rather than to the `guard:` section:
/// `StoreSettings::default()` (the memory store), changed with the `with_` methods.
#[derive(Clone)]
#[non_exhaustive]
pub struct StoreSettings {
    /// Most keys each quota of the memory store tracks before idle (then least-charged)
    /// keys are dropped. Kept in 64 shards, each holding its share rounded up: a quota
    /// tracks at least 64 keys, and up to 63 more than this. At least 1.
    pub max_keys: usize,
    /// How often idle keys are forgotten.
    pub sweep_interval: Duration,
    /// Share limits through Redis instead of holding them in this process.
    #[cfg(feature = "redis")]
    pub redis: Option<RedisSettings>,
}

impl StoreSettings {
    /// With [`max_keys`](Self::max_keys) keys per quota at most.
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// With idle keys forgotten every `every` (the housekeeping's pace).
    pub fn with_sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = every;
        self
    }

    /// With limits shared through Redis (give the builder a
    /// [`key_secret`](crate::ResetGuardBuilder::key_secret) too).
    #[cfg(feature = "redis")]
    pub fn with_redis(mut self, redis: RedisSettings) -> Self {
        self.redis = Some(redis);
        self
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            max_keys: 1_000_000,
            sweep_interval: Duration::from_secs(10),
            #[cfg(feature = "redis")]
            redis: None,
        }
    }
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("max_keys", &self.max_keys)
            .field("sweep_interval", &self.sweep_interval)
            .finish_non_exhaustive()
    }
}

/// Every changed quota of a reload and the quota it replaces, group by group.
#[cfg(feature = "redis")]
pub(crate) fn quota_moves(old: &LimitSettings, new: &LimitSettings) -> Vec<QuotaMove> {
    let mut moves = Vec::new();
    for group in LimitGroup::ALL {
        let (from, to) = (old.quotas(group), new.quotas(group));
        for (quota, origin) in to.iter().zip(successors(from, to)) {
            if let Origin::Replacing(i) = origin {
                moves.push(QuotaMove {
                    group,
                    from: from[i],
                    to: *quota,
                });
            }
        }
    }
    moves
}

/// Where a quota of a reloaded group takes its state from, by index into the old group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The same limit (shadow may differ): its state as it is.
    Kept(usize),
    /// The same limit as a quota another of the group keeps (a shadow copy put beside an
    /// enforced quota): a copy of its state, so that the two move in step from where it
    /// stood, as in Redis, where quotas with the same numbers share one state.
    Copied(usize),
    /// A changed quota: derived from a removed one, the one whose window is nearest its own
    /// (by ratio), each key charged with the requests it had spent.
    /// Several changed quotas may derive from one removed quota.
    Replacing(usize),
    /// Added to a group that lost no quota: afresh.
    New,
}

/// Where each quota of `new` takes its state from in `old` (the same group before a
/// reload), whatever order either is written in: an unchanged quota keeps its own (one
/// whose shadow flag is unchanged first, so that a shadow copy put before the quota it
/// copies does not take its state); a second quota of the same limit, a copy of it; each
/// changed one derives from the removed quota of the nearest window.
pub(crate) fn successors(old: &[Quota], new: &[Quota]) -> Vec<Origin> {
    let mut free: Vec<usize> = (0..old.len()).collect();
    let mut origins = vec![Origin::New; new.len()];
    for same_shadow in [true, false] {
        for (quota, origin) in new.iter().zip(&mut origins) {
            let unchanged = |i: &usize| {
                old[*i].same_limit(quota) && (!same_shadow || old[*i].shadow == quota.shadow)
            };
            if *origin == Origin::New {
                if let Some(at) = free.iter().position(unchanged) {
                    *origin = Origin::Kept(free.remove(at));
                }
            }
        }
    }
    for (quota, origin) in new.iter().zip(&mut origins) {
        if *origin == Origin::New {
            if let Some(i) = old.iter().position(|old| old.same_limit(quota)) {
                *origin = Origin::Copied(i);
            }
        }
    }
    // How far apart two windows are: the larger over the smaller, in thousandths (30
    // minutes is nearer an hour than 10 seconds); ties go the same way whatever the order.
    let apart = |a: &Quota, b: &Quota| {
        let (a, b) = (a.per.as_nanos().max(1), b.per.as_nanos().max(1));
        a.max(b) * 1_000 / a.min(b)
    };
    for (quota, origin) in new.iter().zip(&mut origins) {
        if *origin == Origin::New {
            let nearest = free.iter().min_by_key(|&&i| {
                (
                    apart(&old[i], quota),
                    old[i].capacity_ns,
                    old[i].interval_ns,
                )
            });
            if let Some(&i) = nearest {
                *origin = Origin::Replacing(i);
            }
        }
    }
    origins
}

struct Entry<C> {
    state: Arc<QuotaState<C>>,
    /// The quota as the settings write it: the one answers name, and whether it is
    /// shadow. (A state kept over a reload keeps the quota it was made for, which may be
    /// written differently with the same numbers: `2 per 1h` for `4 per 2h, burst 2`.)
    quota: Quota,
}

/// The live limiter: quota state for every group, the clock and the key hasher. Its
/// shards are locked (`C`) unless one thread replays a log (shard_cell.rs).
pub(crate) struct Limiter<C = RwLock<Shard>> {
    groups: [Vec<Entry<C>>; 4],
    clock: Arc<dyn Clock>,
    max_keys: usize,
    counters: Arc<LimitCounters>,
}

impl<C> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl<C: ShardCell<Shard>> Limiter<C> {
    /// Builds the state for `settings`, so that a reload forgives nobody (as [`successors`]
    /// pairs them): every quota whose limit did not change (shadow may flip) keeps its
    /// state, wherever it moved in its group; a changed quota derives its state from the
    /// removed quota of the nearest window, each key charged with the requests it had spent
    /// ([`QuotaState::carried_from`]); a quota added to a group that lost none starts
    /// afresh. Requests decided on the old state while it is copied are not carried.
    pub(crate) fn new(
        settings: &LimitSettings,
        store: &StoreSettings,
        clock: Arc<dyn Clock>,
        counters: Arc<LimitCounters>,
        previous: Option<&Limiter<C>>,
    ) -> Limiter<C> {
        let mut groups: [Vec<Entry<C>>; 4] = Default::default();
        for group in LimitGroup::ALL {
            let previous_entries: &[Entry<C>] = previous
                .filter(|p| p.max_keys == store.max_keys)
                .map_or(&[], |p| &p.groups[group.index()]);
            let before: Vec<&Arc<QuotaState<C>>> =
                previous_entries.iter().map(|e| &e.state).collect();
            let old: Vec<Quota> = previous_entries.iter().map(|e| e.quota).collect();
            let quotas = &settings.groups[group.index()];
            for (quota, origin) in quotas.iter().zip(successors(&old, quotas)) {
                let evictions = counters.evictions(group);
                let state = match origin {
                    Origin::Kept(i) => before[i].clone(),
                    // (A copy has the same numbers, so it is carried over exactly.)
                    Origin::Replacing(i) | Origin::Copied(i) => Arc::new(QuotaState::carried_from(
                        before[i],
                        *quota,
                        store.max_keys,
                        evictions,
                        clock.now(),
                    )),
                    Origin::New => Arc::new(QuotaState::counting_evictions(
                        *quota,
                        store.max_keys,
                        evictions,
                    )),
                };
                groups[group.index()].push(Entry {
                    state,
                    quota: *quota,
                });
            }
        }
        Limiter {
            groups,
            clock,
            max_keys: store.max_keys,
            counters,
        }
    }

    /// Decides one group for `key` and charges it only if every enforced quota admits.
    /// Shadow quotas are charged when they would admit, and logged when they would deny.
    pub(crate) fn check(
        &self,
        group: LimitGroup,
        key: u64,
        now: u64,
    ) -> Result<Option<Standing>, Denial> {
        self.check_observed(group, key, now, |_, _| {})
    }

    /// [`check`](Self::check), telling `observe` what each quota (by position in the
    /// group) made of the request.
    pub(crate) fn check_observed(
        &self,
        group: LimitGroup,
        key: u64,
        now: u64,
        mut observe: impl FnMut(usize, QuotaOutcome),
    ) -> Result<Option<Standing>, Denial> {
        let entries = &self.groups[group.index()];
        let shard = shard_of(key);
        match entries.as_slice() {
            [] => return Ok(None),
            [single] if !single.quota.shadow => {
                return self.check_one(group, single, key, now, &mut observe)
            }
            _ => {}
        }
        // Every quota's shard stays locked from evaluation to commit, always in the same
        // order, so concurrent requests cannot both take the last slot.
        let mut maps: [Option<C::Write<'_>>; MAX_QUOTAS_PER_GROUP] = [None, None, None, None];
        let mut cells = [None; MAX_QUOTAS_PER_GROUP];
        let mut denial: Option<Denial> = None;
        for (i, entry) in entries.iter().enumerate() {
            let map = maps[i].insert(entry.state.write(shard));
            let cell = entry.state.evaluate(map, key, now);
            cells[i] = Some(cell);
            if let Cell::Deny { retry_ns } = cell {
                let candidate = Denial {
                    group,
                    quota: entry.quota,
                    retry_after: Duration::from_nanos(retry_ns),
                };
                if !entry.quota.shadow
                    && denial.is_none_or(|d| d.retry_after < candidate.retry_after)
                {
                    denial = Some(candidate);
                }
            }
        }
        if let Some(denial) = denial {
            for (i, cell) in cells.iter().take(entries.len()).enumerate() {
                match cell {
                    Some(Cell::Deny { .. }) => observe(i, QuotaOutcome::Denied),
                    _ => observe(i, QuotaOutcome::Uncharged),
                }
            }
            self.counters.count_denied(group);
            return Err(denial);
        }
        // The group admits: a shadow quota that would not have is what promoting it would
        // add. Counted once per request (as the Redis store does), logged per quota.
        let mut shadow_would_deny = false;
        let mut tightest: Option<Standing> = None;
        for (i, entry) in entries.iter().enumerate() {
            if matches!(cells[i], Some(Cell::Deny { .. })) {
                observe(i, QuotaOutcome::Denied);
                tracing::info!(
                    target: "reset_guard::limit",
                    limit = group.name(),
                    quota = %entry.quota,
                    "shadow quota would deny"
                );
                shadow_would_deny = true;
            }
            if let (
                Some(Cell::Admit {
                    tat,
                    remaining,
                    reset_ns,
                }),
                Some(map),
            ) = (cells[i], maps[i].as_mut())
            {
                entry.state.commit(map, key, tat, now);
                self.count_if_near(group, i, &entry.quota, remaining);
                observe(i, QuotaOutcome::Charged { remaining });
                if !entry.quota.shadow {
                    let standing = Standing {
                        group,
                        quota: entry.quota,
                        remaining,
                        reset: Duration::from_nanos(reset_ns),
                    };
                    tightest = Some(standing.tighter(tightest));
                }
            }
        }
        if shadow_would_deny {
            self.counters.count_shadow(group);
        }
        Ok(tightest)
    }

    /// The common case of one enforced quota in a group: one lookup, and for a known key
    /// no exclusive lock.
    fn check_one(
        &self,
        group: LimitGroup,
        entry: &Entry<C>,
        key: u64,
        now: u64,
        observe: &mut impl FnMut(usize, QuotaOutcome),
    ) -> Result<Option<Standing>, Denial> {
        let state = &entry.state;
        match state.decide(key, now) {
            Cell::Admit {
                remaining,
                reset_ns,
                ..
            } => {
                self.count_if_near(group, 0, &entry.quota, remaining);
                observe(0, QuotaOutcome::Charged { remaining });
                Ok(Some(Standing {
                    group,
                    quota: entry.quota,
                    remaining,
                    reset: Duration::from_nanos(reset_ns),
                }))
            }
            Cell::Deny { retry_ns } => {
                observe(0, QuotaOutcome::Denied);
                self.counters.count_denied(group);
                Err(Denial {
                    group,
                    quota: entry.quota,
                    retry_after: Duration::from_nanos(retry_ns),
                })
            }
        }
    }

    fn count_if_near(&self, group: LimitGroup, position: usize, quota: &Quota, remaining: u64) {
        if near_limit(quota, remaining) {
            self.counters.count_near_limit(group, position);
        }
    }

    /// The limiters' time; read once per request so every group sees the same instant.
    pub(crate) fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Reads `key`'s state in every quota of `group`, changing nothing (see
    /// [`QuotaState::peek`]); returns something of it so the reads are not optimised away.
    pub(crate) fn peek(&self, group: LimitGroup, key: u64) -> u64 {
        self.groups[group.index()]
            .iter()
            .fold(0, |sum, e| sum ^ e.state.peek(key))
    }

    /// Forgets idle keys in every quota; returns how many.
    pub(crate) fn sweep(&self) -> usize {
        let now = self.clock.now();
        self.groups
            .iter()
            .flatten()
            .map(|e| e.state.sweep(now))
            .sum()
    }

    /// Keys held by each quota of `group`.
    pub(crate) fn keys(&self, group: LimitGroup) -> Vec<usize> {
        self.groups[group.index()]
            .iter()
            .map(|e| e.state.len())
            .collect()
    }

    /// Keys of `group` dropped while still counting, since start.
    pub(crate) fn forced_evictions(&self, group: LimitGroup) -> u64 {
        self.counters.forced_evictions(group)
    }
}

#[cfg(test)]
mod tests;
