//! The state every request of one guard reads: its settings generation, swapped whole
//! on reload, and what outlives a reload (key hasher, store, clock, counters).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::GuardSettings;
use crate::limit::{Clock, KeyHasher, LimitCounters, Limiter, StoreSettings};
use crate::secret::ApiKey;

/// What every request reads: replaced whole on reload.
#[derive(Debug)]
pub(crate) struct GuardState {
    pub(crate) settings: GuardSettings,
    pub(crate) api_key: ApiKey,
    pub(crate) limiter: Limiter,
    /// The Redis script's view of these settings, when limits live in Redis.
    #[cfg(feature = "redis")]
    pub(crate) redis_specs: Option<Arc<crate::limit::RedisSpecs>>,
}

/// What outlives a reload.
pub(crate) struct GuardCore {
    pub(crate) current: ArcSwap<GuardState>,
    pub(crate) hasher: KeyHasher,
    #[cfg(feature = "redis")]
    pub(crate) redis: Option<Arc<crate::limit::RedisStore>>,
    /// Set by [`ResetGuardBuilder::without_peer_address`].
    pub(crate) peer_optional: bool,
    /// Whether the missing peer address was logged yet (once per layer).
    pub(crate) missing_peer_logged: AtomicBool,
    pub(crate) store: StoreSettings,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) counters: Arc<LimitCounters>,
    /// Told when the guard is dropped, so its housekeeping ends then rather than at its
    /// next tick (a probe every second would otherwise go on until then).
    pub(crate) gone: Arc<tokio::sync::Notify>,
}

impl Drop for GuardCore {
    fn drop(&mut self) {
        // A permit is kept if housekeeping is not waiting yet.
        self.gone.notify_one();
    }
}

impl std::fmt::Debug for GuardCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardCore")
            .field("store", &self.store)
            .field("peer_optional", &self.peer_optional)
            .finish_non_exhaustive()
    }
}
