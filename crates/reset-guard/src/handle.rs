//! [`GuardHandle`]: the running guard's settings, swapped live, and a look at its limiter.

use std::sync::Arc;

use crate::client_ip::ClientIp;
use crate::config::GuardSettings;
use crate::limit::{LimitGroup, Limiter, Quota};
use crate::secret::ApiKey;
use crate::state::{GuardCore, GuardState};

/// Swaps the running guard's settings and key (config reload, key rotation), and looks
/// at its limiter. Requests already inside the guard finish with the settings they
/// started with.
#[derive(Debug, Clone)]
pub struct GuardHandle {
    pub(crate) core: Arc<GuardCore>,
}

impl GuardHandle {
    /// Applies new settings and key to every request from now on. Limiter state is kept
    /// for every quota whose limit did not change; a changed quota derives its state from
    /// the removed quota of the nearest window, each key charged with the requests it had
    /// spent there (with Redis, in the background: `carry.rs`; spawned on the current
    /// Tokio runtime, none outside one).
    pub fn update(&self, settings: GuardSettings, api_key: ApiKey) {
        self.apply(settings, api_key);
    }

    /// [`update`](Self::update) keeping the API key the guard sends now: new limits or
    /// clients need no key in hand.
    pub fn update_settings(&self, settings: GuardSettings) {
        let api_key = self.core.current.load().api_key.clone();
        self.apply(settings, api_key);
    }

    fn apply(&self, settings: GuardSettings, api_key: ApiKey) {
        let core = &self.core;
        let previous = core.current.load();
        for group in LimitGroup::ALL {
            core.counters.carry_near_limit(
                group,
                previous.settings.quotas(group),
                settings.quotas(group),
            );
        }
        let limiter = Limiter::new(
            &settings.limits,
            &core.store,
            core.clock.clone(),
            core.counters.clone(),
            Some(&previous.limiter),
        );
        #[cfg(feature = "redis")]
        let redis_specs = core.redis.as_ref().map(|r| r.specs(&settings.limits));
        #[cfg(feature = "redis")]
        let moves = crate::limit::quota_moves(&previous.settings.limits, &settings.limits);
        #[cfg(feature = "redis")]
        let global_keys = {
            let keys = |specs: &Option<Arc<crate::limit::RedisSpecs>>| {
                specs.as_ref().map_or(1, |specs| specs.global_keys())
            };
            (keys(&previous.redis_specs), keys(&redis_specs))
        };
        core.current.store(Arc::new(GuardState {
            settings,
            api_key,
            limiter,
            #[cfg(feature = "redis")]
            redis_specs,
        }));
        #[cfg(feature = "redis")]
        if let Some(store) = &core.redis {
            let stale = store.forget_denials(
                &previous.settings.limits,
                &core.current.load().settings.limits,
            );
            store.carry_over(moves, global_keys, stale);
        }
    }

    /// Whether the rate-limit store can serve: always for memory; for Redis, whether
    /// it answers, or `true` anyway under `on_error: allow` (requests are served then).
    /// Redis is judged by the probe, which runs in the [`Housekeeping`](crate::Housekeeping)
    /// task: until that task is spawned and has found Redis answering, a Redis store is not
    /// healthy (and under `on_error: deny` not ready), whatever requests it decides.
    pub fn store_ready(&self) -> bool {
        #[cfg(feature = "redis")]
        if let Some(store) = &self.core.redis {
            return store.is_healthy() || store.on_error() == crate::limit::OnError::Allow;
        }
        true
    }

    /// Whether the rate-limit store answered its last probe (memory: always). The probe
    /// runs every second while the housekeeping runs (every 250ms while Redis does not
    /// answer), and soon after a request fails.
    pub fn store_healthy(&self) -> bool {
        #[cfg(feature = "redis")]
        if let Some(store) = &self.core.redis {
            return store.is_healthy();
        }
        true
    }

    /// Requests that could not ask the rate-limit store.
    pub fn store_errors(&self) -> u64 {
        #[cfg(feature = "redis")]
        if let Some(store) = &self.core.redis {
            return store.errors();
        }
        0
    }

    /// The client behind `peer`, by the trusted proxies in force: for what is answered
    /// before the guard sees a request (a malformed one), so that its log line names the
    /// client the limits would.
    pub fn client_ip(&self, peer: std::net::IpAddr, headers: &http::HeaderMap) -> ClientIp {
        let state = self.core.current.load();
        ClientIp::resolve(peer, headers, &state.settings.trusted_proxies)
    }

    /// The settings in force.
    pub fn settings(&self) -> GuardSettings {
        self.core.current.load().settings.clone()
    }

    /// Forgets idle limiter keys now (the sweeper does this periodically).
    pub fn sweep(&self) -> usize {
        self.core.current.load().limiter.sweep()
    }

    /// Keys held by each quota of `group`.
    pub fn tracked_keys(&self, group: LimitGroup) -> Vec<usize> {
        self.core.current.load().limiter.keys(group)
    }

    /// Keys of `group` dropped while still counting because a quota of it held `max_keys`
    /// keys (each such key's next request starts afresh), since start: kept across reloads.
    pub fn forced_evictions(&self, group: LimitGroup) -> u64 {
        self.core.current.load().limiter.forced_evictions(group)
    }

    /// Requests a quota of `group` denied so far (kept across reloads).
    pub fn denied(&self, group: LimitGroup) -> u64 {
        self.core.counters.denied(group)
    }

    /// For each quota of `group` now in force: the admissions since start that left some
    /// key less than a fifth of that quota's burst, so the quota was close to denying it.
    /// Counted by the quota's position in its group, with either store.
    pub fn near_limit(&self, group: LimitGroup) -> Vec<(Quota, u64)> {
        let settings = &self.core.current.load().settings;
        settings
            .quotas(group)
            .iter()
            .enumerate()
            .map(|(position, quota)| (*quota, self.core.counters.near_limit(group, position)))
            .collect()
    }

    /// Requests a shadow quota of `group` would have denied so far.
    pub fn shadow_denied(&self, group: LimitGroup) -> u64 {
        self.core.counters.shadow_denied(group)
    }
}
