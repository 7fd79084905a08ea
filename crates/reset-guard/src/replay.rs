//! Recorded requests decided again by the live limiter under other settings: the same
//! [`Limiter`] the guard runs (memory store), keyed as `check.rs` keys it, charged in the
//! guard's order, on a clock the caller sets to each request's recorded time. The gateway's
//! `simulate` command drives it from an access log.

use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::GuardSettings;
use crate::limit::{
    Denial, Domain, KeyHasher, LimitCounters, LimitGroup, Limiter, QuotaOutcome, SetClock, Shard,
    StoreSettings,
};

/// What the log says about one charged request: the keys each group would be charged on.
#[derive(Debug, Clone, Copy)]
pub struct Recorded<'a> {
    /// The client IP as the guard resolved it.
    pub client_ip: IpAddr,
    /// The client, if the credential was known.
    pub client_id: Option<&'a str>,
    /// The per-email key (the keyed hash the access log carries), if the address was valid.
    pub email_hash: Option<u64>,
}

/// One group's look at a request, for whoever tallies a replay.
#[derive(Debug, Clone, Copy)]
pub struct Charge {
    /// The group.
    pub group: LimitGroup,
    /// The key the group was charged on (keyed hash; only equality means anything).
    pub key: u64,
    /// The quota's position in the group.
    pub position: usize,
    /// What that quota made of the request.
    pub outcome: QuotaOutcome,
}

/// A limiter of its own, fed recorded requests in time order.
pub struct Replay {
    settings: GuardSettings,
    /// One thread's: shards in plain cells rather than locks, the decisions the same.
    limiter: Limiter<RefCell<Shard>>,
    clock: Arc<SetClock>,
    hasher: KeyHasher,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay").finish_non_exhaustive()
    }
}

impl Replay {
    /// A fresh limiter for `settings`' limits, bounded like the gateway's memory store.
    pub fn new(settings: GuardSettings, max_keys: usize) -> Replay {
        let clock = Arc::new(SetClock::default());
        let store = StoreSettings {
            max_keys,
            ..StoreSettings::default()
        };
        let limiter = Limiter::new(
            &settings.limits,
            &store,
            clock.clone(),
            Arc::new(LimitCounters::default()),
            None,
        );
        Replay {
            settings,
            limiter,
            clock,
            // Keys only need to tell clients and addresses apart within this replay.
            hasher: KeyHasher::random(),
        }
    }

    /// The settings replayed.
    pub fn settings(&self) -> &GuardSettings {
        &self.settings
    }

    /// Reads, without changing it, the per-email state `request` will be decided on. A
    /// replay calls this for a handful of requests to come, one after the other: their
    /// addresses' state is spread over megabytes, and reading them together lets the
    /// processor wait for those cache misses at once rather than one per decision.
    pub fn prefetch(&self, request: &Recorded<'_>) -> u64 {
        match (request.client_id, request.email_hash) {
            (Some(_), Some(email)) => self.limiter.peek(LimitGroup::PerEmail, email),
            _ => 0,
        }
    }

    /// Decides `request` at `at_ns` (nanoseconds on any fixed origin, never decreasing)
    /// as the guard would: per IP (unless exempt), then per client once authenticated,
    /// then per email and global once the address was valid, each group only if the ones
    /// before admitted. `observe` hears every quota of every group reached. Returns the
    /// enforced quota that denied, if any.
    pub fn decide(
        &self,
        at_ns: u64,
        request: &Recorded<'_>,
        mut observe: impl FnMut(Charge),
    ) -> Option<Denial> {
        self.clock.set(at_ns);
        let now = self.limiter.now();
        let limits = &self.settings.limits;
        let mut charges: [Option<(LimitGroup, u64)>; 4] = [None; 4];
        if !limits.is_exempt(request.client_ip) {
            charges[0] = Some((
                LimitGroup::PerIp,
                limits.ip_key(request.client_ip, &self.hasher),
            ));
        }
        if let Some(id) = request.client_id {
            let key = self.hasher.hash(Domain::Client, id.as_bytes());
            charges[1] = Some((LimitGroup::PerClient, key));
            if let Some(email) = request.email_hash {
                charges[2] = Some((LimitGroup::PerEmail, email));
                charges[3] = Some((LimitGroup::Global, 0));
            }
        }
        for (group, key) in charges.into_iter().flatten() {
            let result = self
                .limiter
                .check_observed(group, key, now, |position, outcome| {
                    observe(Charge {
                        group,
                        key,
                        position,
                        outcome,
                    })
                });
            if let Err(denial) = result {
                return Some(denial);
            }
        }
        None
    }
}
