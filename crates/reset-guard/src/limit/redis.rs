//! Limits shared by every replica through Redis (README.md, "Several replicas: limits in
//! Redis"): one script call per request decides all of its groups atomically on the
//! server's clock. Through Sentinel, the server is the master the sentinels name, asked
//! again every second and whenever a request fails; when it changes, every connection
//! moves to the new one. In Cluster mode (`redis+cluster://`), one request's groups hash
//! to different slots, so each group with quotas is one script call over that group's
//! keys (one hash tag), made in request order and ended by the first denial.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};

mod batch;
mod carry;
mod cluster;
mod denials;
mod global_keys;
mod held;
mod keep_alive;
mod late_nodes;
mod sentinel;
mod settings;
mod walk;

pub(crate) use batch::RedisSpecs;
use batch::{run_batches, Charges, Job, REPLY_LEN};
pub(crate) use carry::QuotaMove;
use cluster::{Cluster, DirectMasters};
use held::{hold, Held, Release};
use sentinel::{Master, SentinelPool};
use settings::Sentinels;
pub use settings::{InvalidRedisSettings, OnError, RedisSettings, MAX_GLOBAL_KEYS};

use super::{
    Clock, Decision, Denial, LimitCounters, LimitGroup, LimitSettings, MonotonicClock, Quota,
    Standing, MAX_QUOTAS_PER_GROUP,
};

/// Whether `quota`, replacing `from` in a reload, denies at least as long: as long an
/// interval or longer, no larger burst.
fn no_looser(quota: &Quota, from: &Quota) -> bool {
    quota.interval_ns >= from.interval_ns && quota.burst <= from.burst
}

/// Per group, the old quotas whose cached denials stand only until a reload's walk has
/// carried the state of the quotas replacing them over, and which reload that was (its
/// number: denials cached after it are not its to forget).
#[derive(Debug, Default, Clone)]
pub(crate) struct StaleDenials {
    quotas: [Vec<Quota>; 4],
    reload: u64,
}

/// What Redis says of a write it refuses at `maxmemory` (under `noeviction`), after its
/// `OOM` code (which the Redis client prints as `"OOM": command not allowed ...`).
const OOM_REFUSAL: &str = "command not allowed when used memory";
/// The probe's cause when requests' writes were refused so since it last ran.
const WRITES_REFUSED: &str =
    "Redis refused requests' writes for want of memory since the last probe \
     (OOM command not allowed when used memory > 'maxmemory'; the probe's own small write fit): \
     raise maxmemory or free memory, keeping maxmemory-policy noeviction";
/// Least time between two log lines about failed requests.
const FAILURE_LOG_INTERVAL_NS: u64 = 1_000_000_000;
/// Least time between two warnings of a new cause of a failure.
const CAUSE_LOG_INTERVAL_NS: u64 = 5_000_000_000;
/// Least time between two probes prompted by failed requests.
const PROMPTED_PROBE_INTERVAL_NS: u64 = 250_000_000;

/// A probe a failed request prompted, running: says so when it ends, or its task is
/// dropped unfinished.
struct PromptedProbe(Arc<RedisStore>);

impl Drop for PromptedProbe {
    fn drop(&mut self) {
        self.0
            .prompted_probe_running
            .store(false, Ordering::Relaxed);
    }
}
/// How much longer than `timeout` the probe waits for the cause of a late answer.
const CAUSE_WAIT: Duration = Duration::from_millis(500);
/// The script that decides a batch of requests.
const SCRIPT: &str = include_str!("redis.lua");
/// Most requests waiting in one of a thread's queues for Redis (in Cluster mode, a thread
/// has one per master and one for requests not yet placed); beyond that they fail fast (as
/// `on_error` says).
const QUEUE_LIMIT: usize = 65_536;
/// Why a request beyond [`QUEUE_LIMIT`] failed.
const QUEUE_FULL: &str = "too many requests waiting for Redis";

static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(0);

/// A store's batching queue on one thread: the store's id, the connection generation it
/// was made in, a weak handle to it, the release of the store's hold on it, and when it
/// was made (its connection with it).
type QueueOfThread = (
    u64,
    Generation,
    mpsc::WeakSender<Job>,
    Release<mpsc::Sender<Job>>,
    tokio::time::Instant,
);

thread_local! {
    /// Per thread: each store's batching queue on this thread, and the connection
    /// generation it was made in. Weak: the store holds the queue (`held_queues`) until
    /// the entry's `Release` goes with the entry or the thread (held.rs).
    static QUEUES: std::cell::RefCell<Vec<QueueOfThread>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The cause of a failure last warned of, and when. A new cause is warned of, but not
/// more often than every few seconds: during a failover the cause can change from one
/// attempt to the next, every fraction of a second.
#[derive(Default)]
pub(super) struct CauseLog(Option<(String, u64)>);

impl CauseLog {
    /// Whether `cause`, found at `now` ([`MonotonicClock`] nanoseconds), is to be warned
    /// of; if so it is remembered as the last.
    pub(super) fn is_new(&mut self, cause: &str, now: u64) -> bool {
        let new = match &self.0 {
            None => true,
            Some((known, at)) => known != cause && now.saturating_sub(*at) >= CAUSE_LOG_INTERVAL_NS,
        };
        if new {
            self.0 = Some((cause.to_owned(), now));
        }
        new
    }

    /// The cause last warned of, while the failure lasts.
    pub(super) fn last(&self) -> Option<&str> {
        self.0.as_ref().map(|(cause, _)| cause.as_str())
    }

    /// Forgets the failure once it is over; whether there was one.
    pub(super) fn clear(&mut self) -> bool {
        self.0.take().is_some()
    }
}

/// Which connections a queue's was made among: the master's generation (Sentinel: one per
/// master named) and the store's reconnects.
type Generation = (u64, u64);

/// The Redis-backed limiter, shared by every settings generation.
pub(crate) struct RedisStore {
    /// Cluster mode: the cluster (then `master` and `sentinels` are none).
    cluster: Option<Cluster>,
    /// None only in Sentinel mode, until the sentinels have named a master.
    master: ArcSwapOption<Master>,
    /// Sentinel mode: whom to ask for the master.
    sentinels: Option<SentinelPool>,
    /// Held while the sentinels are asked, so one question runs at a time.
    resolving: tokio::sync::Mutex<()>,
    /// When a failed request last prompted a probe ([`MonotonicClock`] nanoseconds).
    last_prompted_probe: AtomicU64,
    /// Whether a probe a failed request prompted is running: no other is started
    /// meanwhile (each may wait on sentinels or Redis that hang).
    prompted_probe_running: AtomicBool,
    /// Sentinel mode: when the sentinels were first asked (by the probe, or by a request
    /// where the host runs none), on [`Self::clock`]. Requests before any master is named
    /// wait for their answer as long as making connections may take only that long after.
    sentinels_first_asked: std::sync::OnceLock<u64>,
    /// The credentials and CA every client is built with.
    settings: RedisSettings,
    script: Arc<redis::Script>,
    /// Tells this store's queues apart in each thread's list.
    id: u64,
    config: ConnectionManagerConfig,
    prefix: String,
    /// Standalone and Sentinel mode: two of the probe's keys in different slots (see
    /// [`keys_in_two_slots`]).
    probe_reads: Vec<String>,
    timeout: Duration,
    on_error: OnError,
    /// Whether Redis serves, as `/readyz` and `store_up` report it: the probe's verdict
    /// alone (every second, and soon after a failed request). A request says little either
    /// way: one can time out while Redis serves, or be decided by the masters of a cluster
    /// that are left; and the probe remakes the connections before it says Redis is back.
    healthy: AtomicBool,
    /// Whether the probe has ever found Redis serving (a TLS hint is for a server never
    /// reached: [`with_tls_hint`]).
    ever_served: AtomicBool,
    /// Set when the probe failed (its own connection breaks with every restart of Redis,
    /// however short); cleared by its next success, which then counts a reconnect.
    broken: AtomicBool,
    /// The cause of the probe's failure, as logged; none while it succeeds.
    probe_failure: Mutex<CauseLog>,
    /// When a failed request was last logged, and how many failed since.
    failure_logged: AtomicU64,
    failed_unlogged: AtomicU64,
    /// Why the last failed request failed, for the line that counts it when the probe
    /// writes that line.
    last_failure: Mutex<Option<String>>,
    /// Held by the walk carrying changed quotas over a reload (carry.rs): one at a time.
    carrying: tokio::sync::Mutex<()>,
    /// Counts the times the probe found Redis back after a failure. A thread's connection
    /// that saw no request since may be dead (Redis restarted under it) and would fail the
    /// next request: each thread's queue made before is remade, with a new connection,
    /// before `/readyz` says ready again.
    reconnects: AtomicU64,
    errors: AtomicU64,
    /// Whether Redis refused a request's write for want of memory since the probe last
    /// ran: near `maxmemory` the probe's own small write can fit while most requests'
    /// calls do not, so the probe takes the requests' word for it.
    writes_refused: AtomicBool,
    denials: Mutex<denials::DenialCache>,
    /// How many reloads the store has seen; a cached denial keeps the count it was cached
    /// at.
    reloads: AtomicU64,
    /// The stale denials of reloads whose walks are not done: they stand through the
    /// reloads after, until their own walk is done.
    awaiting_walks: Mutex<Vec<StaleDenials>>,
    clock: MonotonicClock,
    counters: Arc<LimitCounters>,
    /// Told how long each request waited for its decision (the host's metrics).
    wait_observer: Option<crate::layer::StoreWaitObserver>,
    /// Each thread's batching queue, held here until the store or the thread goes
    /// (held.rs).
    held_queues: Held<mpsc::Sender<Job>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Prepares the client; the connection is made on first use and remade whenever it
    /// breaks (one attempt each time: a request does not wait out a backoff, and the probe
    /// tries again every 250 ms while Redis is away), so the gateway starts and serves
    /// while Redis is away.
    pub(crate) fn new(
        settings: &RedisSettings,
        counters: Arc<LimitCounters>,
    ) -> redis::RedisResult<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings::connect_timeout(settings.timeout)))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(0);
        let sentinels = settings.sentinels();
        let cluster = match settings.cluster_nodes() {
            Some(nodes) => Some(Cluster::new(
                settings.cluster_client(&nodes, true)?,
                settings.cluster_client(&nodes, false)?,
                redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(settings::connect_timeout(settings.timeout))
                    .set_response_timeout(settings.timeout),
                DirectMasters {
                    settings: settings.clone(),
                    config: config.clone(),
                    scheme: settings::scheme_of(&nodes),
                },
            )),
            None => None,
        };
        let master = match &sentinels {
            None if cluster.is_some() => None,
            None => Some(Arc::new(Master::new(0, None, settings.client()?, &config)?)),
            Some(sentinels) => {
                // Only checks each sentinel's URL; the master is asked for on first use.
                for node in &sentinels.nodes {
                    settings.client_at(node, false)?;
                }
                None
            }
        };
        Ok(RedisStore {
            cluster,
            master: ArcSwapOption::new(master),
            sentinels: sentinels.map(SentinelPool::new),
            resolving: tokio::sync::Mutex::new(()),
            last_prompted_probe: AtomicU64::new(0),
            prompted_probe_running: AtomicBool::new(false),
            sentinels_first_asked: std::sync::OnceLock::new(),
            settings: settings.clone(),
            script: Arc::new(redis::Script::new(SCRIPT)),
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            config,
            prefix: settings.key_prefix.clone(),
            probe_reads: keys_in_two_slots(&settings.key_prefix),
            timeout: settings.timeout,
            on_error: settings.on_error,
            // Not ready until the first probe finds Redis serving (it runs at once): a
            // gateway under `deny` whose Redis is away, or whose sentinels are slow to name
            // the master, is not put in rotation to answer 503s meanwhile.
            healthy: AtomicBool::new(false),
            ever_served: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            probe_failure: Mutex::new(CauseLog::default()),
            failure_logged: AtomicU64::new(0),
            failed_unlogged: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            carrying: tokio::sync::Mutex::new(()),
            errors: AtomicU64::new(0),
            writes_refused: AtomicBool::new(false),
            denials: Mutex::new(denials::DenialCache::default()),
            reloads: AtomicU64::new(0),
            awaiting_walks: Mutex::new(Vec::new()),
            clock: MonotonicClock::default(),
            counters,
            wait_observer: None,
            held_queues: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Whether the last exchange with Redis worked.
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Requests that could not ask Redis.
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// What `on_error` says.
    pub(crate) fn on_error(&self) -> OnError {
        self.on_error
    }

    /// The script's view of a settings generation.
    pub(crate) fn specs(&self, limits: &LimitSettings) -> Arc<RedisSpecs> {
        Arc::new(RedisSpecs::new(
            limits,
            &self.prefix,
            self.cluster.is_some(),
            self.settings.global_keys,
        ))
    }

    /// After a reload from `old` to `new` limits, forgets the cached denials that would
    /// now answer differently from Redis, and returns, per group, the quotas whose
    /// denials stand only until the reload's walk has carried their state over
    /// ([`forget_stale_denials`](Self::forget_stale_denials)).
    ///
    /// A denial stands as it is where its quota is unchanged (as written) and enforced, and
    /// no other enforced quota of its group is new, changed or newly enforced: Redis would
    /// answer the same, with the same quota and `Retry-After`. A denial whose quota changed
    /// to one [no looser](no_looser) and enforced stands until
    /// the walk is done, through any reload made meanwhile: so a flood refused before a
    /// reload that tightens its limit stays refused rather than reaching Redis before the
    /// new quota's state is there, and once it is there Redis answers with the new
    /// quota's own wait. Every other denial is forgotten at once: Redis holds the state
    /// that decides it.
    pub(crate) fn forget_denials(&self, old: &LimitSettings, new: &LimitSettings) -> StaleDenials {
        let reload = self.reloads.fetch_add(1, Ordering::Relaxed) + 1;
        let awaiting = self
            .awaiting_walks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Per group, found before the cache is locked: the old quotas whose denials stand,
        // and of those the ones that stand only until the walk is done.
        let verdicts = LimitGroup::ALL.map(|group| {
            let (before, after) = (old.quotas(group), new.quotas(group));
            let origins = super::successors(before, after);
            // An enforced quota that denies no longer than before: kept from an enforced
            // one, or a copy of one.
            let settled = |quota: &Quota, origin: &super::Origin| match origin {
                super::Origin::Kept(i) | super::Origin::Copied(i) => {
                    quota.shadow || !before[*i].shadow
                }
                _ => quota.shadow,
            };
            let group_settled = after.iter().zip(&origins).all(|(q, o)| settled(q, o));
            let mut standing = Vec::new();
            let mut until_carried = Vec::new();
            for (quota, origin) in after.iter().zip(&origins) {
                if quota.shadow {
                    continue;
                }
                match origin {
                    // Written alike too (`4 per 2h, burst 2` has the numbers of `2 per 1h`,
                    // but answers name it as written).
                    super::Origin::Kept(i) if group_settled && before[*i] == *quota => {
                        standing.push(before[*i]);
                    }
                    super::Origin::Replacing(i) if no_looser(quota, &before[*i]) => {
                        standing.push(before[*i]);
                        until_carried.push(before[*i]);
                    }
                    _ => {}
                }
            }
            // A reload before an earlier one's walk is done leaves that walk's denials
            // standing, unless it loosens their group: drops a quota it enforced, or
            // replaces one with a looser one.
            let loosened = before.iter().enumerate().any(|(i, from)| {
                !from.shadow
                    && !after.iter().zip(&origins).any(|(quota, origin)| {
                        !quota.shadow
                            && match origin {
                                super::Origin::Kept(j) => *j == i,
                                super::Origin::Replacing(j) => *j == i && no_looser(quota, from),
                                _ => false,
                            }
                    })
            });
            if !loosened {
                for earlier in &awaiting {
                    standing.extend_from_slice(&earlier.quotas[group.index()]);
                }
            }
            (standing, until_carried)
        });
        let mut cache = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|group, denial, _| {
            verdicts[group.index()]
                .0
                .iter()
                .any(|quota| quota.same_limit(&denial.quota))
        });
        drop(cache);
        let stale = StaleDenials {
            quotas: verdicts.map(|(_, until_carried)| until_carried),
            reload,
        };
        if stale.quotas.iter().any(|quotas| !quotas.is_empty()) {
            self.awaiting_walks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(stale.clone());
        }
        stale
    }

    /// Forgets the denials that stood only until a reload's walk carried the state of
    /// their changed quotas over: Redis now answers them itself, with the new quota.
    /// Denials cached after that reload are Redis's own answers, and stay.
    pub(crate) fn forget_stale_denials(&self, stale: &StaleDenials) {
        if !self.walk_over(stale) {
            return;
        }
        let mut cache = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|group, denial, cached_at| {
            cached_at >= stale.reload
                || !stale.quotas[group.index()]
                    .iter()
                    .any(|quota| quota.same_limit(&denial.quota))
        });
    }

    /// The reload's walk is over, carried or not: its stale denials no longer stand
    /// through later reloads. Whether it had any. Where the walk carried nothing (it
    /// failed for good, or there was no runtime to walk on), they stand until they run
    /// out.
    pub(crate) fn walk_over(&self, stale: &StaleDenials) -> bool {
        let mut awaiting = self
            .awaiting_walks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = awaiting.len();
        awaiting.retain(|earlier| earlier.reload != stale.reload);
        awaiting.len() < before
    }

    /// Drops expired cached denials.
    pub(crate) fn sweep(&self) {
        let now = self.clock.now();
        self.denials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sweep(now);
    }

    /// Asks Redis whether it serves (the script, run for no request; in Sentinel mode the
    /// sentinels first, in Cluster mode on every master) and records whether it did in
    /// time.
    pub(crate) async fn probe(&self) -> bool {
        // Taken before the probe asks: a refusal while it runs counts at the next one.
        let refused_writes = self.writes_refused.swap(false, Ordering::Relaxed);
        let mut answer = match &self.cluster {
            Some(cluster) => {
                cluster
                    .every_master_answers(&self.script, &self.prefix, self.timeout)
                    .await
            }
            None => self.probe_master().await,
        };
        if answer.is_ok() && refused_writes {
            answer = Err(WRITES_REFUSED.to_owned());
        }
        let up = self.record_probe(answer);
        // After the verdict, which it does not change: a sentinel down costs its timeout.
        self.check_other_sentinels().await;
        up
    }

    /// The script, run for no request on the master, and a write of the probe's own key,
    /// after asking the sentinels whether it moved: a Redis at `maxmemory` that evicts
    /// nothing answers the script but refuses every write it makes (`OOM`), which fails
    /// every request.
    async fn probe_master(&self) -> Result<(), String> {
        let resolved = self.resolve().await;
        let Some(master) = self.master.load_full() else {
            let why = resolved.err().unwrap_or_default();
            return Err(format!(
                "the sentinels named no Redis master that answers as one: {why}"
            ));
        };
        let mut connection = master.connection.clone();
        let key = format!("{}:probe", self.prefix);
        // Each exchange within `timeout`, as a request's call is; the first may have to
        // make the connection (after one failed), which takes longer.
        let run = async {
            let connect = settings::connect_timeout(self.timeout);
            let auth = self.settings.still_authenticates(&mut connection);
            in_time(connect, auth).await??;
            // The next exchange reads two of the probe's keys in different slots, as a
            // request's call does: a Redis Cluster node refuses it (`CROSSSLOT`), and so
            // every request; any other answer of the server's own is answer enough.
            let read = redis::cmd("MGET").arg(&self.probe_reads).clone();
            let asked = read.query_async::<redis::Value>(&mut connection);
            match in_time(connect, asked).await? {
                // (A node whose slots are not assigned answers CLUSTERDOWN; one that does
                // not serve the keys' slots, MOVED or ASK.)
                Err(error)
                    if matches!(
                        error.code(),
                        Some("CROSSSLOT" | "CLUSTERDOWN" | "MOVED" | "ASK")
                    ) =>
                {
                    return Err(A_CLUSTER_NODE.to_owned())
                }
                Err(error) if error.code().is_none() => return Err(error.to_string()),
                _ => {}
            }
            // The script as a request's call runs it, its keys in different slots: a proxy
            // that spreads keys over shards may read them together (the `MGET` above) but
            // refuse a script's (`CROSSSLOT`), and so every request.
            let script = batch::run_for_nothing(
                &mut connection,
                &self.script,
                self.timeout,
                &self.probe_reads,
            );
            script.await?;
            answer_in_time(self.timeout, batch::write_probe(&mut connection, &key)).await
        };
        let answer = run.await;
        if answer.is_err() {
            // The Redis client remakes a connection only after an I/O error: one whose
            // making failed otherwise (AUTH refused while an ACL user was off, a server
            // still loading) would fail every probe after, though Redis serves again. The
            // next probe gets a connection of its own; the threads' follow once it answers.
            if let Ok(fresh) = Master::new(
                master.generation,
                master.address.clone(),
                master.client.clone(),
                &self.config,
            ) {
                let _ = self.master.compare_and_swap(&master, Some(Arc::new(fresh)));
            }
        }
        // Which server said it, and what that says about the settings.
        let (named, hint) = match &master.address {
            Some((host, port)) => (
                format!("master {host}:{port}"),
                answer.as_ref().err().map_or("", |cause| access_hint(cause)),
            ),
            None => (
                format!("server {}", self.settings.url),
                answer
                    .as_ref()
                    .err()
                    .map_or("", |cause| standalone_hint(cause)),
            ),
        };
        match (answer, resolved) {
            (Ok(_), _) => Ok(()),
            (Err(cause), Ok(())) => Err(format!("{named}: {cause}{hint}")),
            (Err(cause), Err(sentinels)) => {
                Err(format!("{named}: {cause}; the sentinels: {sentinels}"))
            }
        }
    }

    /// Records what the probe found. A failure's cause is logged when it is new, and the
    /// return of Redis after one; then every thread's connection is made anew.
    fn record_probe(&self, answer: Result<(), String>) -> bool {
        let up = self.record_probe_answer(answer);
        self.log_failures(None);
        up
    }

    fn record_probe_answer(&self, answer: Result<(), String>) -> bool {
        let mut last = self.probe_failure.lock().unwrap_or_else(|e| e.into_inner());
        match answer {
            Ok(()) => {
                if self.broken.swap(false, Ordering::Relaxed) {
                    // Published before readiness, which a worker's next queue lookup sees.
                    self.reconnects.fetch_add(1, Ordering::Release);
                }
                if last.clear() {
                    // The failed requests not in a line yet are this failure's: counted
                    // here, not in the next failure's first line.
                    let failed = self.failed_unlogged.swap(0, Ordering::Relaxed);
                    self.failure_logged.store(0, Ordering::Relaxed);
                    tracing::info!(target: "reset_guard::limit", failed, "Redis answers the probe again");
                }
                self.healthy.store(true, Ordering::Release);
                self.ever_served.store(true, Ordering::Relaxed);
                true
            }
            Err(cause) => {
                self.broken.store(true, Ordering::Relaxed);
                let tls = self.settings.url.starts_with("rediss");
                // A cluster seed that answered proves the scheme right for its port.
                let reached = self.ever_served.load(Ordering::Relaxed)
                    || self.cluster.as_ref().is_some_and(|c| c.seed_answered());
                let cause = with_auth_hint(with_tls_hint(cause, tls, reached));
                if last.is_new(&cause, self.clock.now()) {
                    tracing::warn!(target: "reset_guard::limit", error = %cause, "Redis does not answer the probe");
                }
                self.healthy.store(false, Ordering::Relaxed);
                false
            }
        }
    }

    /// Tells `observer` how long each request waits for its decision from Redis.
    pub(crate) fn observing_waits(
        mut self,
        observer: Option<crate::layer::StoreWaitObserver>,
    ) -> Self {
        self.wait_observer = observer;
        self
    }

    /// When a request starts to wait, if anyone is told how long it waited.
    fn wait_started(&self) -> Option<std::time::Instant> {
        self.wait_observer
            .as_ref()
            .map(|_| std::time::Instant::now())
    }

    /// A request's wait since `started`, to the observer.
    fn waited(&self, started: Option<std::time::Instant>) {
        if let (Some(observe), Some(started)) = (&self.wait_observer, started) {
            observe(started.elapsed());
        }
    }

    /// Decides a plan's charges: from the local denial cache when it can, else with one
    /// script call. Nothing is done until the future is first polled: a thread's queue to
    /// Redis is a task of the runtime that polls it, not of whatever runtime (or none) the
    /// service happened to be called in.
    pub(crate) fn decide(
        self: &Arc<Self>,
        specs: &Arc<RedisSpecs>,
        charges: &[(LimitGroup, u64)],
    ) -> Pin<Box<dyn Future<Output = Decision> + Send>> {
        let (store, specs, charges) = (self.clone(), specs.clone(), Charges::new(charges));
        Box::pin(async move { store.decide_now(&specs, charges.as_slice()).await })
    }

    fn decide_now(
        self: &Arc<Self>,
        specs: &Arc<RedisSpecs>,
        charges: &[(LimitGroup, u64)],
    ) -> Pin<Box<dyn Future<Output = Decision> + Send>> {
        let now = self.clock.now();
        let spread = specs.spread_global(charges);
        let charges = spread.as_ref().map_or(charges, Charges::as_slice);
        // A group known to deny needs no round trip; the groups before it still do.
        let cached = self.cached_denial(charges, now);
        let asked = cached.map_or(charges.len(), |(i, _)| i);
        let charges = &charges[..asked];
        if charges
            .iter()
            .all(|(group, _)| specs.group(*group).quotas.is_empty())
        {
            let decision = match cached {
                Some((i, denial)) => {
                    self.counters.count_denied(denial.group);
                    Decision::Denied(i, denial)
                }
                None => Decision::Admitted(None),
            };
            return Box::pin(std::future::ready(decision));
        }
        // A decision's connections and batches run as tasks of the runtime that polls it:
        // polled outside one (another executor), a request fails as `on_error` says rather
        // than in a panic.
        if tokio::runtime::Handle::try_current().is_err() {
            let why = "the decision was awaited outside a Tokio runtime, where the Redis \
                       store's connections run";
            return Box::pin(std::future::ready(self.fail(why, cached)));
        }
        if self.cluster.is_some() {
            return self.decide_in_cluster(specs, Charges::new(charges), cached);
        }
        let charges = Charges::new(charges);
        let specs = specs.clone();
        let (reply, answer) = oneshot::channel();
        let job = Job {
            specs: specs.clone(),
            charges,
            reply: reply.into(),
        };
        // Until the sentinels have named a master (just after start), they are asked first.
        let early = if self.master.load().is_some() {
            Ok(self.enqueue(job))
        } else {
            Err(job)
        };
        let store = self.clone();
        let started = self.wait_started();
        Box::pin(async move {
            let decision = store
                .await_queued(early, answer, charges, &specs, cached)
                .await;
            store.waited(started);
            decision
        })
    }

    /// The decision of a job handed to a queue (`early`: queued, or not yet, until the
    /// sentinels name a master), from its `answer`, as `on_error` says when there is none.
    async fn await_queued(
        self: &Arc<Self>,
        early: Result<Result<Queued, String>, Job>,
        answer: oneshot::Receiver<Result<[i64; REPLY_LEN], String>>,
        charges: Charges,
        specs: &Arc<RedisSpecs>,
        cached: Option<(usize, Denial)>,
    ) -> Decision {
        // One deadline for the whole decision: `timeout`, or for the first requests, which
        // wait for connections to be made (before any master is named, the sentinels'
        // first answer; this thread's first, or the first after the master changed, the
        // connection to Redis), as long as that may take: four times `timeout`, at least
        // 250 ms. The sentinels' answer and Redis's come out of that one deadline.
        let started = tokio::time::Instant::now();
        let allowance = settings::connect_timeout(self.timeout);
        let connecting = started + allowance;
        let mut deadline = started + self.timeout;
        let queued = match early {
            Ok(queued) => queued,
            Err(job) => {
                // Sentinels that have not answered for that long since first asked are
                // away, as Redis can be: `timeout`, as for any request then.
                let now = self.clock.now();
                let first_asked = *self.sentinels_first_asked.get_or_init(|| now);
                if u128::from(now.saturating_sub(first_asked)) < allowance.as_nanos() {
                    deadline = connecting;
                }
                let _ = tokio::time::timeout_at(deadline, self.resolve_first()).await;
                self.enqueue(job)
            }
        };
        match queued {
            Err(why) => return self.fail(&why, cached),
            Ok(Queued::WhileConnecting) => deadline = connecting,
            Ok(Queued::Connected) => {}
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Ok(reply))) => self.read_reply(&reply, charges.as_slice(), specs, cached),
            Ok(Ok(Err(error))) => self.fail(&error, cached),
            Ok(Err(_)) => self.fail("the Redis worker stopped", cached),
            Err(_) => self.fail("timed out", cached),
        }
    }

    /// Hands a job to this thread's queue.
    fn enqueue(&self, job: Job) -> Result<Queued, String> {
        let (queue, queued) = self.queue()?;
        queue.try_send(job).map_err(|_| QUEUE_FULL.to_owned())?;
        Ok(queued)
    }

    /// This thread's batching queue, started on first use. Each worker thread batches its
    /// own requests over its own Redis connection, so a decision never hops threads. A
    /// queue made for an earlier master is replaced; it ends once its last job is answered.
    fn queue(&self) -> Result<(mpsc::Sender<Job>, Queued), String> {
        let Some(master) = self.master.load_full() else {
            return Err("the sentinels have named no Redis master yet".to_owned());
        };
        let current = (master.generation, self.reconnects.load(Ordering::Acquire));
        // A thread whose thread-locals are being destroyed (a decision asked from another
        // one's destructor) has no queue to give: the request fails as `on_error` says.
        QUEUES
            .try_with(|queues| {
                let mut queues = queues.borrow_mut();
                if let Some((sender, made)) = queues
                    .iter()
                    .find(|(id, generation, ..)| *id == self.id && *generation == current)
                    .and_then(|(_, _, weak, _, made)| Some((weak.upgrade()?, *made)))
                    .filter(|(sender, _)| !sender.is_closed())
                {
                    return Ok((sender, Queued::since(made, self.timeout)));
                }
                let (client, config) = (master.client.clone(), self.config.clone());
                let connection =
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                        .map_err(|e| e.to_string())?;
                let remake = move || {
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone()).ok()
                };
                let (sender, receiver) = mpsc::channel(QUEUE_LIMIT);
                tokio::spawn(run_batches(
                    receiver,
                    connection,
                    remake,
                    self.script.clone(),
                    self.timeout,
                ));
                // This store's queue made before on this thread (an earlier master or
                // connection) ends once its last job is answered; so do dropped stores'.
                queues.retain(|(id, _, weak, ..)| *id != self.id && weak.strong_count() > 0);
                let release = hold(&self.held_queues, sender.clone());
                let made = tokio::time::Instant::now();
                queues.push((self.id, current, sender.downgrade(), release, made));
                Ok((sender, Queued::WhileConnecting))
            })
            .unwrap_or_else(|_| Err("the thread is exiting".to_owned()))
    }

    /// A failed request: as `on_error` says, or denied by `cached` (see [`failed`]). Redis is
    /// probed now rather than at the next
    /// second, at most every 250ms: the probe, not the request, says whether the store is
    /// up (a request can time out while Redis serves, or fail on one master of a cluster
    /// while another answers), and in Sentinel mode it asks the sentinels whether the
    /// master moved (a connection refused, or `READONLY` from a demoted master).
    pub(super) fn fail(self: &Arc<Self>, why: &str, cached: Option<(usize, Denial)>) -> Decision {
        let now = self.clock.now();
        let last = self.last_prompted_probe.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= PROMPTED_PROBE_INTERVAL_NS
            && self
                .last_prompted_probe
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // Outside a runtime (a decision asked while the thread is torn down) there is
            // none to probe on; the housekeeping's probe still runs each second.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                if !self.prompted_probe_running.swap(true, Ordering::Relaxed) {
                    let running = PromptedProbe(self.clone());
                    runtime.spawn(async move {
                        running.0.probe().await;
                    });
                }
            }
        }
        self.failed(why, cached)
    }

    /// Counts and logs a failed request; it is denied when a later group of it is known to
    /// deny (`cached`, the local denial cache), whatever `on_error` says: had Redis
    /// answered, it would have been refused either way, by that group or an earlier one,
    /// and under `allow` an outage would otherwise let a flood through to an address
    /// already refused. Else as `on_error` says.
    fn failed(&self, why: &str, cached: Option<(usize, Denial)>) -> Decision {
        if why.contains(OOM_REFUSAL) {
            self.writes_refused.store(true, Ordering::Relaxed);
        }
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.failed_unlogged.fetch_add(1, Ordering::Relaxed);
        self.log_failures(Some(why));
        match (cached, self.on_error) {
            (Some((i, denial)), _) => {
                self.counters.count_denied(denial.group);
                Decision::Denied(i, denial)
            }
            (None, OnError::Allow) => Decision::Unlimited,
            (None, OnError::Deny) => Decision::Unavailable,
        }
    }

    /// Logs the failed requests not in a line yet: one line a second at most, however many
    /// fail (the count is in the line, and in store_errors_total; the cause in the
    /// probe's). Called by each failed request (`why` it failed) and by each probe, so a
    /// burst's count is logged within a second or so, not held until the next failure.
    fn log_failures(&self, why: Option<&str>) {
        if self.failed_unlogged.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(why) = why {
            // Not waited for: a thread holding it records a cause as recent.
            if let Ok(mut last) = self.last_failure.try_lock() {
                if last.as_deref() != Some(why) {
                    *last = Some(why.to_owned());
                }
            }
        }
        let now = self.clock.now();
        let last = self.failure_logged.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= FAILURE_LOG_INTERVAL_NS)
            && self
                .failure_logged
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let failed = self.failed_unlogged.swap(0, Ordering::Relaxed);
            if failed == 0 {
                return;
            }
            // A request that waited out its timeout knows only that; the probe may know why
            // (a refused password, an untrusted certificate).
            let probe = self.probe_failure.lock().unwrap_or_else(|e| e.into_inner());
            let probe_error = probe.last().map(str::to_owned);
            drop(probe);
            // Written by the probe's call: the last request's cause.
            let last = why
                .is_none()
                .then(|| self.last_failure.lock().ok()?.clone())
                .flatten();
            let error = why.or(last.as_deref());
            tracing::warn!(target: "reset_guard::limit", error, probe_error, failed, on_error = self.on_error.as_str(), "rate-limit store unavailable");
        }
    }

    fn read_reply(
        &self,
        reply: &[i64; REPLY_LEN],
        groups: &[(LimitGroup, u64)],
        specs: &RedisSpecs,
        cached: Option<(usize, Denial)>,
    ) -> Decision {
        let field = |i: usize| reply.get(i).copied().unwrap_or(0);
        let quota_at = |g: i64, q: i64| -> Option<(usize, LimitGroup, u64, Quota)> {
            let gi = usize::try_from(g).ok()?.checked_sub(1)?;
            let qi = usize::try_from(q).ok()?.checked_sub(1)?;
            let (group, key) = *groups.get(gi)?;
            Some((gi, group, key, *specs.group(group).quotas.get(qi)?))
        };
        let shadow_mask = field(5);
        let near_mask = field(6);
        for (i, (group, _)) in groups.iter().enumerate() {
            if shadow_mask & (1 << i) != 0 {
                self.counters.count_shadow(*group);
                log_shadow(*group, &specs.group(*group).quotas);
            }
            for q in 0..MAX_QUOTAS_PER_GROUP {
                if near_mask & (1 << (4 * i + q)) != 0 {
                    self.counters.count_near_limit(*group, q);
                }
            }
        }
        if field(0) == 1 {
            let Some((gi, group, key, quota)) = quota_at(field(1), field(2)) else {
                return self.failed("unexpected reply from the rate-limit script", None);
            };
            let retry = Duration::from_micros(u64::try_from(field(3)).unwrap_or(0));
            let denial = Denial {
                group,
                quota,
                retry_after: retry,
            };
            self.remember(group, key, denial);
            self.counters.count_denied(group);
            return Decision::Denied(gi, denial);
        }
        if let Some((i, denial)) = cached {
            self.counters.count_denied(denial.group);
            return Decision::Denied(i, denial);
        }
        let standing = quota_at(field(1), field(2)).map(|(_, group, _, quota)| Standing {
            group,
            quota,
            remaining: u64::try_from(field(3)).unwrap_or(0),
            reset: Duration::from_micros(u64::try_from(field(4)).unwrap_or(0)),
        });
        Decision::Admitted(standing)
    }

    fn remember(&self, group: LimitGroup, key: u64, denial: Denial) {
        let now = self.clock.now();
        let until = now.saturating_add(denial.retry_after.as_nanos() as u64);
        let reload = self.reloads.load(Ordering::Relaxed);
        let mut cache = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        cache.remember((group, key), until, denial, now, reload);
    }

    /// The first charge with a denial still in force, with its retry time brought up to date.
    fn cached_denial(&self, charges: &[(LimitGroup, u64)], now: u64) -> Option<(usize, Denial)> {
        let cache = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        if cache.is_empty() {
            return None;
        }
        charges.iter().enumerate().find_map(|(i, charge)| {
            let (until, denial) = cache.get(charge)?;
            (until > now).then(|| {
                (
                    i,
                    Denial {
                        retry_after: Duration::from_nanos(until - now),
                        ..*denial
                    },
                )
            })
        })
    }
}

/// A shadow quota of `group` would have denied a request the group admitted, logged as
/// the memory store logs it. The script says which group, not which quota: a group with
/// one shadow quota (the usual rollout) names it; one with several names them all, one of
/// which would have denied.
fn log_shadow(group: LimitGroup, quotas: &[Quota]) {
    let mut shadows = quotas.iter().filter(|quota| quota.shadow);
    match (shadows.next(), shadows.next()) {
        (Some(quota), None) => tracing::info!(
            target: "reset_guard::limit",
            limit = group.name(),
            quota = %quota,
            "shadow quota would deny"
        ),
        _ => {
            let named: Vec<String> = quotas
                .iter()
                .filter(|quota| quota.shadow)
                .map(ToString::to_string)
                .collect();
            tracing::info!(
                target: "reset_guard::limit",
                limit = group.name(),
                one_of = %named.join(", "),
                "shadow quota would deny"
            );
        }
    }
}

/// Whether `host` can be a host name or an IP address: at most 253 characters (a DNS
/// name's most), of letters, digits and the few signs names and addresses use (an IPv6
/// address's colons, and its zone after `%`).
pub(super) fn host_name_like(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'%'))
}

/// What a standalone server's refusal says about the settings: a replica or a sentinel
/// where the master belongs.
fn standalone_hint(cause: &str) -> &'static str {
    if cause.contains("read only replica") || cause.contains("READONLY") {
        " (a replica: `url` must name the master; behind Sentinel, `mode: sentinel` follows it)"
    } else if cause.contains("unknown command") {
        " (a sentinel, or a server that runs no scripts? `url` names a Redis server that runs EVALSHA; the sentinels go in `nodes`, with `mode: sentinel`)"
    } else if cause.contains("CROSSSLOT") || cause.contains("CrossSlot") {
        " (keys spread over shards behind one address, and a request's keys are in different slots: `mode: cluster`, with the service's Redis Cluster endpoint among the seed `nodes`, where it offers one; or a `key_prefix` in braces, `{reset-gateway}`, which puts every key in one slot, so on one shard)"
    } else {
        access_hint(cause)
    }
}

/// What a server's refusal says about the credentials, the ACL user or the server itself.
fn access_hint(cause: &str) -> &'static str {
    if cause.contains("NOAUTH") {
        " (the server wants a password: store.redis.password_env or password_file)"
    } else if cause.contains("NOPERM") || cause.contains("can't run this command") {
        " (the ACL user lacks a command or key the gateway needs: the README's `ACL SETUSER` line, \"Several replicas\", lists them)"
    } else if cause.contains("Parse error") {
        " (the server's answer is not Redis's protocol: is `url` a Redis server's port?)"
    } else if cause.contains("AuthenticationFailed") && !cause.contains("store.redis.password_env")
    {
        " (the server refused store.redis.password_env or password_file (and username): not its password, or it has none, as a sentinel given where a Redis server belongs has none)"
    } else {
        ""
    }
}

/// `cause`, with what TLS may have to do with it: a server asking for a client certificate
/// the settings do not hold; and, while Redis has never `served` (a stall or restart of one
/// that did is no matter of TLS), a server that does not speak TLS (it sends a TLS
/// handshake no answer, which looks like a hang) or a TLS port reached without TLS (it
/// drops the connection). A server whose certificate was read speaks TLS: its certificate
/// is the cause.
fn with_tls_hint(cause: String, tls: bool, served: bool) -> String {
    let hint = if cause.contains("CertificateRequired") {
        " (the server asks for a client certificate: store.redis.cert_file and key_file)"
    } else if cause.contains("UnknownCA") {
        " (the server trusts no CA that signed the client certificate: store.redis.cert_file must come from the CA of the server's tls-ca-cert-file)"
    } else if cause.contains("UnknownIssuer") {
        " (the server's certificate is signed by no CA the gateway trusts: store.redis.ca_file for a private CA)"
    } else if served || cause.contains("peer certificate") {
        ""
    } else if tls && (cause.contains("no answer") || cause.contains("timed out")) {
        " (if that port does not speak TLS, a TLS handshake gets no answer: rediss:// is for a TLS port)"
    } else if !tls && (cause.contains("reset by peer") || cause.contains("broken pipe")) {
        " (if that port speaks TLS, the URL must start with rediss://)"
    } else {
        ""
    };
    cause + hint
}

/// The probe's cause, with the settings to look at where Redis refused the credentials and
/// the step that found it did not say so already (a cluster's seeds refuse them while the
/// slot map is read, before the probe's own `AUTH`).
fn with_auth_hint(cause: String) -> String {
    let refused = [
        "WRONGPASS",
        "invalid username-password",
        "AuthenticationFailed",
    ];
    let hint = if cause.contains("password_env") {
        ""
    } else if refused.iter().any(|sign| cause.contains(sign)) {
        " (the server does not take store.redis.password_env or password_file (and username))"
    } else if cause.contains("NOAUTH") {
        " (the server wants a password: store.redis.password_env or password_file)"
    } else {
        ""
    };
    cause + hint
}

/// Two of the probe's keys (`{prefix}:probe`, `{prefix}:probe:N`) whose Redis Cluster
/// slots differ, so that a cluster node refuses reading both at once; one key where no two
/// can differ (a prefix holding a hash tag puts every key in its slot, and a request's keys
/// too).
fn keys_in_two_slots(prefix: &str) -> Vec<String> {
    let slot = |key: &str| {
        let tagged = key.find('{').and_then(|open| {
            let close = key[open + 1..].find('}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        });
        crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key).as_bytes()) % 16384
    };
    let first = format!("{prefix}:probe");
    let other = (0..64)
        .map(|n| format!("{prefix}:probe:{n}"))
        .find(|key| slot(key) != slot(&first));
    std::iter::once(first).chain(other).collect()
}

/// The probe's cause when `mode: standalone` names a Redis Cluster node.
const A_CLUSTER_NODE: &str = "the server is a Redis Cluster node, where a request's keys \
     live in different slots: use `mode: cluster`, with the node among the seed `nodes`";

/// Where a job was queued: on a connection its thread's queue has made already, or on one
/// that may still be in the making (within the time making one may take, from when its
/// queue was made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queued {
    Connected,
    WhileConnecting,
}

impl Queued {
    /// For a queue (and its connection) made at `made`, with the store's `timeout`.
    fn since(made: tokio::time::Instant, timeout: Duration) -> Queued {
        match made.elapsed() < settings::connect_timeout(timeout) {
            true => Queued::WhileConnecting,
            false => Queued::Connected,
        }
    }
}

/// A probe's exchange, answered within `timeout` or not. A late answer is waited for a
/// little longer, for its cause: a connection that is refused its password or its
/// certificate can take longer than a request may wait to say so.
pub(super) async fn answer_in_time<T>(
    timeout: Duration,
    exchange: impl Future<Output = Result<T, impl std::fmt::Display>>,
) -> Result<T, String> {
    in_time(timeout, exchange).await?.map_err(|e| e.to_string())
}

/// [`answer_in_time`], giving the exchange's own error back when it came in time (for the
/// caller to read its code), and said as why otherwise: an error that came late is the
/// cause, never an answer.
async fn in_time<T, E: std::fmt::Display>(
    timeout: Duration,
    exchange: impl Future<Output = Result<T, E>>,
) -> Result<Result<T, E>, String> {
    let mut exchange = std::pin::pin!(exchange);
    if let Ok(answer) = tokio::time::timeout(timeout, exchange.as_mut()).await {
        return Ok(answer);
    }
    match tokio::time::timeout(CAUSE_WAIT, exchange).await {
        Ok(Err(error)) => Err(error.to_string()),
        Ok(Ok(_)) => Err(format!("answered, but after more than {timeout:?}")),
        Err(_) => Err(format!("no answer within {:?}", timeout + CAUSE_WAIT)),
    }
}

/// A Redis near `maxmemory` can take the probe's own small write while refusing most
/// requests' calls (`OOM`): the probe takes the requests' word for it.
#[cfg(test)]
mod writes_refused_tests {
    use super::*;
    use test_support::RedisServer;

    #[tokio::test]
    async fn requests_refused_for_memory_take_the_store_down_until_a_probe_passes_without() {
        let server = RedisServer::start();
        let mut settings = RedisSettings::new(server.url());
        settings.timeout = Duration::from_millis(500);
        let store = RedisStore::new(&settings, Arc::new(LimitCounters::default())).unwrap();
        assert!(store.probe().await, "Redis serves");
        // A write refused for memory, as the Redis client words it.
        let full = RedisServer::start();
        for setting in ["maxmemory-policy noeviction", "maxmemory 1"] {
            full.command(&format!("CONFIG SET {setting}")).unwrap();
        }
        let client = redis::Client::open(full.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let refused = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async::<()>(&mut connection)
            .await
            .unwrap_err();
        let why = format!("the rate-limit script: {refused}");
        let _ = store.failed(&why, None);
        assert!(!store.probe().await, "a request's write was refused since");
        assert!(!store.is_healthy());
        let said = store
            .probe_failure
            .lock()
            .unwrap()
            .last()
            .unwrap_or_default()
            .to_owned();
        assert!(said.contains("raise maxmemory"), "{said}");
        assert!(store.probe().await, "no refusal since the last probe");
        // Other failures are the probe's own to judge.
        let _ = store.failed("no answer within 500ms", None);
        assert!(store.probe().await);
    }
}

#[cfg(test)]
mod probe_tests {
    use super::{in_time, keys_in_two_slots, standalone_hint, with_auth_hint, with_tls_hint};
    use std::time::Duration;

    /// An exchange that fails after its time (a connection's own timeout firing late) is
    /// said as its error, never as an answer that came late.
    #[tokio::test(start_paused = true)]
    async fn a_late_error_is_the_cause_and_a_late_answer_is_said_late() {
        let after = |ms, answer: Result<(), &'static str>| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            answer
        };
        let timeout = Duration::from_millis(300);
        let late_error = in_time(timeout, after(400, Err("connection timed out"))).await;
        assert_eq!(late_error, Err("connection timed out".to_owned()));
        let late_answer = in_time(timeout, after(400, Ok(()))).await;
        assert_eq!(
            late_answer,
            Err("answered, but after more than 300ms".to_owned())
        );
        let in_time_error = in_time(timeout, after(100, Err("NOAUTH"))).await;
        assert_eq!(in_time_error, Ok(Err("NOAUTH")));
    }

    #[test]
    fn a_refusal_of_the_credentials_or_the_acl_user_names_what_to_set() {
        let cases = [
            ("NOAUTH: Authentication required.", "store.redis.password_env"),
            (
                "the rate-limit script: ERR The user executing the script can't run this command or subcommand script: @user_script:63",
                "`ACL SETUSER` line",
            ),
            ("NOPERM this user has no permissions to access one of the keys", "`ACL SETUSER` line"),
            ("Parse error at 1 Unexpected '72'", "not Redis's protocol"),
        ];
        for (cause, named) in cases {
            assert!(standalone_hint(cause).contains(named), "{cause}");
        }
        assert_eq!(standalone_hint("Connection refused"), "");
    }

    #[test]
    fn refused_credentials_name_the_settings_once() {
        let refused = "seed redis://10.0.0.1:7000: WRONGPASS invalid username-password pair";
        let hinted = with_auth_hint(refused.to_owned());
        assert!(
            hinted.ends_with("password_env or password_file (and username))"),
            "{hinted}"
        );
        // Said already (the probe's own AUTH): not twice.
        let said = format!("{refused} (not store.redis.password_env or password_file)");
        assert_eq!(with_auth_hint(said.clone()), said);
        let missing = with_auth_hint("NOAUTH Authentication required.".to_owned());
        assert!(missing.contains("wants a password"), "{missing}");
        assert_eq!(
            with_auth_hint("Connection refused".to_owned()),
            "Connection refused"
        );
    }

    #[test]
    fn a_tls_hint_is_given_where_tls_may_be_the_cause() {
        let certificate = "received fatal alert: CertificateRequired".to_owned();
        for served in [false, true] {
            let hinted = with_tls_hint(certificate.clone(), true, served);
            assert!(hinted.contains("store.redis.cert_file"), "{hinted}");
        }
        // The server refused the client certificate's CA.
        let unknown_ca = "received fatal alert: UnknownCA".to_owned();
        let hinted = with_tls_hint(unknown_ca, true, false);
        assert!(
            hinted.contains("store.redis.cert_file must come from"),
            "{hinted}"
        );
        let late = "no answer within 50ms".to_owned();
        assert!(with_tls_hint(late.clone(), true, false).contains("rediss:// is for a TLS port"));
        assert_eq!(
            with_tls_hint(late.clone(), true, true),
            late,
            "a stall of a Redis that served"
        );
        assert_eq!(with_tls_hint(late.clone(), false, false), late);
        let reset = "Connection reset by peer (os error 104)".to_owned();
        assert!(with_tls_hint(reset.clone(), false, false).contains("must start with rediss://"));
        assert_eq!(with_tls_hint(reset.clone(), false, true), reset);
        // A port that sent its certificate speaks TLS, whatever else timed out.
        let name = "CLUSTER SLOTS: timed out; seed rediss://127.0.0.1:7000: invalid peer \
                    certificate: certificate not valid for name \"127.0.0.1\""
            .to_owned();
        assert_eq!(with_tls_hint(name.clone(), true, false), name);
        let issuer = "invalid peer certificate: UnknownIssuer".to_owned();
        let hinted = with_tls_hint(issuer, true, true);
        assert!(
            hinted.ends_with("store.redis.ca_file for a private CA)"),
            "{hinted}"
        );
    }

    #[test]
    fn the_probe_reads_two_keys_in_different_slots_where_there_can_be_two() {
        let slot = |key: &str| crc16::State::<crc16::XMODEM>::calculate(key.as_bytes()) % 16384;
        let keys = keys_in_two_slots("reset-gateway");
        assert_eq!(keys[0], "reset-gateway:probe");
        assert!(keys[1].starts_with("reset-gateway:probe:"), "{keys:?}");
        assert_ne!(slot(&keys[0]), slot(&keys[1]));
        // A hash tag in the prefix puts every key in one slot: one key is read.
        assert_eq!(keys_in_two_slots("{rg}"), ["{rg}:probe"]);
    }
}

#[cfg(test)]
mod cause_log_tests {
    use super::{CauseLog, CAUSE_LOG_INTERVAL_NS};

    #[test]
    fn a_new_cause_is_warned_of_at_most_every_few_seconds() {
        let mut log = CauseLog::default();
        assert!(log.is_new("refused", 1));
        assert!(!log.is_new("refused", 2), "the same cause again");
        assert!(!log.is_new("timed out", 3), "a new cause too soon");
        assert!(log.is_new("timed out", 1 + CAUSE_LOG_INTERVAL_NS));
        assert!(log.clear());
        assert!(!log.clear());
        assert!(
            log.is_new("timed out", 2 + CAUSE_LOG_INTERVAL_NS),
            "a new failure"
        );
    }
}
