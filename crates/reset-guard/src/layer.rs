//! [`ResetGuardLayer`]: builds the guard around a service and swaps its settings live.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Weak};

use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use tower::Layer;

use crate::config::GuardSettings;
use crate::handle::GuardHandle;
use crate::limit::{Clock, KeyHasher, LimitCounters, Limiter, MonotonicClock, StoreSettings};
use crate::secret::ApiKey;
use crate::service::ResetGuard;
use crate::state::{GuardCore, GuardState};

/// Guards the QuickBlox password-reset path. See the [crate docs](crate) for an example.
#[derive(Debug, Clone)]
pub struct ResetGuardLayer {
    core: Arc<GuardCore>,
}

impl ResetGuardLayer {
    /// A guard with these settings that sends `api_key` upstream in place of client
    /// tokens, with in-memory limits under default store settings and no background work
    /// (idle keys are reclaimed as new ones arrive). [`builder`](Self::builder) gives the
    /// sweeper, Redis and a key secret. Limits run on the system's monotonic clock
    /// (`std::time::Instant`): Tokio's paused test clock does not move them.
    pub fn new(settings: GuardSettings, api_key: ApiKey) -> Self {
        let (layer, _housekeeping) = Self::builder(settings, api_key)
            .build()
            .expect("memory limits need no setup that can fail");
        layer
    }

    /// A builder for the store and the key secret.
    pub fn builder(settings: GuardSettings, api_key: ApiKey) -> ResetGuardBuilder {
        ResetGuardBuilder {
            settings,
            api_key,
            store: StoreSettings::default(),
            clock: None,
            hasher: None,
            key_secret_short: false,
            peer_optional: false,
            store_wait: None,
        }
    }

    /// A handle that replaces the settings of every service this layer built.
    pub fn handle(&self) -> GuardHandle {
        GuardHandle {
            core: self.core.clone(),
        }
    }
}

/// Builds a [`ResetGuardLayer`].
pub struct ResetGuardBuilder {
    settings: GuardSettings,
    api_key: ApiKey,
    store: StoreSettings,
    clock: Option<Arc<dyn Clock>>,
    hasher: Option<KeyHasher>,
    /// A key secret under [`MIN_KEY_SECRET`] bytes was given: `build` refuses it.
    key_secret_short: bool,
    peer_optional: bool,
    store_wait: Option<StoreWaitObserver>,
}

/// What [`ResetGuardBuilder::on_store_wait`] is given.
pub(crate) type StoreWaitObserver = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

/// Fewest bytes of a key secret: the keyed hashes of addresses in Redis and in the logs are
/// only as hard to reverse as the secret is to guess.
const MIN_KEY_SECRET: usize = 16;

impl std::fmt::Debug for ResetGuardBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResetGuardBuilder")
            .field("settings", &self.settings)
            .field("store", &self.store)
            .field("key_secret", &self.hasher.as_ref().map(|_| "(set)"))
            .field("peer_optional", &self.peer_optional)
            .finish_non_exhaustive()
    }
}

impl ResetGuardBuilder {
    /// Where limits live and how they are kept: the in-memory store's bounds and sweep
    /// interval, or Redis (`StoreSettings::with_redis`, with the `redis` feature).
    pub fn store(mut self, store: StoreSettings) -> Self {
        self.store = store;
        self
    }

    /// The limiters' clock (tests pass a `ManualClock`).
    #[cfg(test)]
    pub(crate) fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Derives the limit keys' hash from a secret of at least 16 bytes, so stored keys and
    /// log tags are stable across restarts and replicas. Without it, the memory store hashes
    /// with a random key of its own; with Redis it is required (`build` refuses to go
    /// without it): every replica must give the same secret to share one limit, and hashes
    /// of addresses under no secret could be reversed with a dictionary by anyone who
    /// reads Redis.
    pub fn key_secret(mut self, secret: &[u8]) -> Self {
        self.key_secret_short = secret.len() < MIN_KEY_SECRET;
        self.hasher = Some(KeyHasher::from_secret(secret));
        self
    }

    /// Serves requests on the guarded path that carry no [`PeerAddr`](crate::PeerAddr):
    /// they are all attributed to one unknown address (`0.0.0.0`), so
    /// together they share **one** per-IP bucket (`limits.per_ip`): once it is spent,
    /// every client without an address is refused until it refills.
    ///
    /// Without this call such a request is answered 500 and the first one is logged
    /// (`tracing::error!`) with what to do: a missing peer address is a wiring mistake
    /// in the host service, not something to limit around. Use it only where no client
    /// address exists (a Unix socket, a test harness) or where something in front already
    /// limits per client.
    pub fn without_peer_address(mut self) -> Self {
        self.peer_optional = true;
        self
    }

    /// Called with how long each request waited for the Redis store's decision (asked in a
    /// batch with others), or for its failure (the whole `timeout` for one that timed out,
    /// next to nothing for a refused connection), for the host's metrics: Redis
    /// slowing down under its timeout shows nowhere else. Not called with the in-memory
    /// store, nor for a request a cached denial answered without asking Redis.
    pub fn on_store_wait(
        mut self,
        observe: impl Fn(std::time::Duration) + Send + Sync + 'static,
    ) -> Self {
        self.store_wait = Some(Arc::new(observe));
        self
    }

    /// Builds the layer, and the housekeeping its limits need: a future that forgets idle
    /// limiter keys every `store.sweep_interval` (and, with Redis, probes the server every
    /// second so readiness follows it and a lost connection is remade before requests need
    /// it). Nothing runs until you spawn it, as with tower's `Buffer::pair`; it ends by
    /// itself once the layer, every service built from it and every handle are gone. Left unspawned,
    /// memory stays bounded by `store.max_keys` and idle keys are reclaimed as new ones
    /// arrive, but Redis is only probed when a request fails.
    ///
    /// # Errors
    ///
    /// If `store.sweep_interval` is zero; with `store.redis`, if its settings cannot work
    /// (`RedisSettings::check`, or a global quota whose burst is below `global_keys`), no
    /// Tokio runtime is running, or the URL is `rediss://` and no rustls crypto provider is
    /// installed for the process.
    pub fn build(self) -> Result<(ResetGuardLayer, Housekeeping), StoreError> {
        if self.store.sweep_interval.is_zero() {
            return Err(StoreError(
                "sweep_interval must be longer than zero".to_owned(),
            ));
        }
        if self.store.max_keys == 0 {
            return Err(StoreError("max_keys must be at least 1".to_owned()));
        }
        if self.key_secret_short {
            return Err(StoreError(format!(
                "the key secret must hold at least {MIN_KEY_SECRET} bytes"
            )));
        }
        let clock = self
            .clock
            .unwrap_or_else(|| Arc::new(MonotonicClock::default()));
        let counters = Arc::new(LimitCounters::default());
        #[cfg(feature = "redis")]
        let redis = match &self.store.redis {
            Some(settings) => {
                settings
                    .check()
                    .map_err(|why| StoreError(why.to_string()))?;
                let spread = settings.global_keys;
                let global = self.settings.quotas(crate::LimitGroup::Global);
                if let Some(quota) = global.iter().find(|q| q.burst < u32::from(spread)) {
                    return Err(StoreError(format!(
                        "global_keys {spread} spreads each global quota over {spread} keys, \
                         and a global quota ({} per {:?}) has a burst of {}: each key would \
                         hold less than one request; give it a burst of at least {spread}, or \
                         lower global_keys",
                        quota.requests, quota.per, quota.burst
                    )));
                }
                if self.hasher.is_none() {
                    return Err(StoreError(format!(
                        "with Redis, give key_secret() the same secret of {MIN_KEY_SECRET}+ \
                         bytes on every replica: without one, the hashed addresses in Redis \
                         could be reversed with a dictionary"
                    )));
                }
                // The standalone client starts its connection's task when made; every mode
                // is held to it alike.
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(StoreError(
                        "with Redis, build the layer inside a Tokio runtime".to_owned(),
                    ));
                }
                // The client's TLS takes the process's rustls provider and would panic at
                // each connection without one: say so now, and leave the choice to the
                // application.
                if settings.url.starts_with("rediss")
                    && rustls::crypto::CryptoProvider::get_default().is_none()
                {
                    return Err(StoreError(
                        "rediss:// needs the process's rustls crypto provider: install one \
                         before build(), e.g. rustls::crypto::ring::default_provider()\
                         .install_default()"
                            .to_owned(),
                    ));
                }
                Some(Arc::new(
                    crate::limit::RedisStore::new(settings, counters.clone())
                        .map_err(|e| StoreError(e.to_string()))?
                        .observing_waits(self.store_wait.clone()),
                ))
            }
            None => None,
        };
        let limiter = Limiter::new(
            &self.settings.limits,
            &self.store,
            clock.clone(),
            counters.clone(),
            None,
        );
        #[cfg(feature = "redis")]
        let redis_specs = redis.as_ref().map(|r| r.specs(&self.settings.limits));
        let gone = Arc::new(tokio::sync::Notify::new());
        let core = Arc::new(GuardCore {
            current: ArcSwap::from_pointee(GuardState {
                settings: self.settings,
                api_key: self.api_key,
                limiter,
                #[cfg(feature = "redis")]
                redis_specs,
            }),
            hasher: self.hasher.unwrap_or_else(KeyHasher::random),
            #[cfg(feature = "redis")]
            redis,
            peer_optional: self.peer_optional,
            missing_peer_logged: AtomicBool::new(false),
            store: self.store,
            clock,
            counters,
            gone: gone.clone(),
        });
        let housekeeping = Housekeeping(Box::pin(housekeeping(Arc::downgrade(&core), gone)));
        Ok((ResetGuardLayer { core }, housekeeping))
    }
}

/// The store could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate-limit store: {0}")]
pub struct StoreError(String);

/// The limits' background work, returned by [`ResetGuardBuilder::build`] for the caller
/// to spawn (`tokio::spawn(housekeeping)`). It ends as soon as the layer, every service
/// built from it and every [`GuardHandle`] are dropped (a handle can still change the
/// guard, so it keeps it); to end it before, abort its task.
#[must_use = "housekeeping does nothing unless spawned"]
pub struct Housekeeping(Pin<Box<dyn Future<Output = ()> + Send>>);

impl Future for Housekeeping {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for Housekeeping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Housekeeping")
    }
}

/// Sweeps idle keys every `sweep_interval` and, with Redis, probes it every second (every
/// 250ms while it does not answer), until the guard is gone.
async fn housekeeping(weak: Weak<GuardCore>, gone: Arc<tokio::sync::Notify>) {
    #[cfg(feature = "redis")]
    let work = async {
        tokio::join!(sweep(weak.clone()), probe_redis(weak));
    };
    #[cfg(not(feature = "redis"))]
    let work = sweep(weak);
    let gone = gone.notified();
    let (mut work, mut gone) = (std::pin::pin!(work), std::pin::pin!(gone));
    std::future::poll_fn(|cx| match work.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(()),
        Poll::Pending => gone.as_mut().poll(cx),
    })
    .await;
}

async fn sweep(weak: Weak<GuardCore>) {
    let Some(every) = weak.upgrade().map(|core| core.store.sweep_interval) else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: nothing to sweep yet.
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(core) = weak.upgrade() else { return };
        let state = core.current.load_full();
        #[cfg(feature = "redis")]
        if let Some(store) = &core.redis {
            store.sweep();
        }
        drop(core);
        // Sweeping a million keys takes milliseconds: keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || state.limiter.sweep()).await;
    }
}

/// Probes Redis every second so readiness reflects it and a lost connection is remade
/// before requests need it; every 250ms while it does not answer, so readiness comes back
/// soon after Redis does.
#[cfg(feature = "redis")]
async fn probe_redis(weak: Weak<GuardCore>) {
    loop {
        let Some(store) = weak.upgrade().and_then(|s| s.redis.clone()) else {
            return;
        };
        let up = store.probe().await;
        drop(store);
        let next = if up { 1000 } else { 250 };
        tokio::time::sleep(std::time::Duration::from_millis(next)).await;
    }
}

impl<S> Layer<S> for ResetGuardLayer {
    type Service = ResetGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResetGuard::new(inner, self.core.clone())
    }
}

#[cfg(test)]
mod tests;
