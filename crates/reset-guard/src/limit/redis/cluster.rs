//! Cluster mode: a request's groups decided one after another, each on the node that holds
//! its keys' slot.
//!
//! One request's groups live in different slots, so each group is one decision (consecutive
//! groups whose slots one master serves are one, decided in order in one step); but the
//! decisions waiting on one thread (of many requests) whose slots one master serves go to it
//! as one script call, as in the other modes. That is what keeps a cluster near the
//! standalone mode's cost: a call per group of every request would cost the cluster
//! several times the CPU (benches/README.md, "Redis modes"). A request's walk over its
//! groups goes from one master's call straight to the next master's queue on the thread
//! (`walk.rs`), and back to the request only once decided. The script is told the keys
//! as arguments (declared keys must share one slot) and carries Redis 7's
//! `allow-cross-slot-keys` flag; it checks that it serves every key before it writes any,
//! so a slot map gone stale costs a second try, never a wrong decision. These calls go over
//! a connection of the thread's own to each master (by the slot map's address), not
//! through the cluster client's routing. Where that cannot work (Redis before 7, no slot
//! map yet, a key not served where the map said) a group is one call with declared keys
//! (`call_by_tag`), sent to the master the slot map (or the last one read) names over a
//! connection of the gateway's own, which follows `MOVED` and `ASK` itself and waits out a
//! slot in motion. Only without any map, or while the master it names cannot be reached,
//! does such a call go through the cluster client:
//! while that client reads its slot map again (after a `MOVED`) it holds every command
//! sent through it, and after a dropped connection it would send a call again, when Redis
//! may have run it (it is made to send nothing again itself).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Weak;

use redis::aio::MultiplexedConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use tokio::sync::mpsc::error::TrySendError;

use super::batch::{
    answer, gather, numbers, ping_by, redirected, refused_at_once, why_not, CallArgs, Refusal,
    Reply, LATE_CALL,
};
use super::keep_alive::{KeepAlive, IDLE_CHECK};
use super::late_nodes::LateNodes;
use super::walk::{Walk, Walker};
use super::*;

/// Slots in a Redis Cluster.
const SLOTS: usize = 16_384;
/// Least time between two reads of the slot map (after a call found it stale).
const SLOT_MAP_INTERVAL_NS: u64 = 200_000_000;

/// Cluster mode: the client the probe's connection is made from, and the one every
/// per-thread connection for script calls is made from.
pub(super) struct Cluster {
    /// Follows redirections and sends again on its own: for the probe.
    pub(super) client: redis::cluster::ClusterClient,
    /// Sends nothing twice: for script calls (see [`call_by_tag`]).
    calls: redis::cluster::ClusterClient,
    pub(super) config: redis::cluster::ClusterConfig,
    /// The probe's connection; made on first use, then reconnected by the client itself.
    pub(super) probe: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
    /// The probe's own connection to each master it asked.
    masters_pinged: tokio::sync::Mutex<Vec<ProbedMaster>>,
    /// What every thread's batching needs to send one call per master.
    pub(super) nodes: Arc<NodeCalls>,
    /// Each thread's queues, held here until the store or the thread goes (held.rs).
    held_queues: held::Held<Arc<ThreadQueues>>,
    /// Set once a seed node answers `CLUSTER SLOTS` ([`Cluster::seed_answered`]).
    seed_answered: AtomicBool,
}

impl Cluster {
    /// `direct`: how to reach one master by its address (the credentials, TLS and
    /// timeouts of the settings), for the calls that go to one master.
    pub(super) fn new(
        client: redis::cluster::ClusterClient,
        calls: redis::cluster::ClusterClient,
        config: redis::cluster::ClusterConfig,
        direct: DirectMasters,
    ) -> Self {
        Cluster {
            client,
            calls,
            config,
            probe: tokio::sync::OnceCell::new(),
            masters_pinged: tokio::sync::Mutex::new(Vec::new()),
            nodes: Arc::new(NodeCalls::new(direct)),
            held_queues: Arc::new(Mutex::new(Vec::new())),
            seed_answered: AtomicBool::new(false),
        }
    }

    /// A connection for a thread's script calls, which sends nothing twice.
    pub(super) fn connection(&self) -> redis::cluster_async::ClusterConnection {
        self.calls
            .get_pending_async_connection_with_config(self.config.clone())
    }

    /// Whether every master serving slots says, within `timeout`, that the cluster is
    /// whole (`cluster_state:ok`: while a master is missing, the others refuse every
    /// command, CLUSTERDOWN; with `cluster-require-full-coverage no`, slots left unserved on
    /// purpose do not count). A request's groups live on several masters, so one master
    /// gone fails nearly every request. The masters are those `CLUSTER SLOTS` names, each
    /// asked over a connection of the probe's own: the cluster client's `PING` to all
    /// masters passes over one whose connection it has dropped. A master whose ACL leaves
    /// `CLUSTER INFO` out (`NOPERM`) counts as whole once it answers. Each master is then
    /// asked to run the script for no request (one that refuses it fails every request), and
    /// to write a key of the probe's own in one of its slots: a master at `maxmemory` that
    /// evicts nothing answers the rest but refuses every write (`OOM`).
    pub(super) async fn every_master_answers(
        &self,
        script: &redis::Script,
        prefix: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let map = self.slot_owners(timeout).await?;
        let urls: Option<Vec<_>> = map
            .masters
            .iter()
            .enumerate()
            .map(|(index, address)| {
                let (host, port) = address.as_ref()?;
                let url = settings::node_url(self.nodes.direct.scheme, host, *port);
                let client = self.nodes.direct.settings.client_at(&url, true).ok()?;
                let slot = map.owner.iter().position(|&o| usize::from(o) == index)?;
                Some((format!("master {host}:{port}"), client, slot as u16))
            })
            .collect();
        let Some(masters) = urls else {
            // A master named without an address ("the node you asked"), or by one no URL
            // can hold (a zone in an IPv6 address): only the cluster client reaches it, and
            // is asked a PING to every master (the script is not run there).
            let mut connection = self.probe_connection().await;
            let ping = connection.route_command(
                redis::cmd("PING").clone(),
                RoutingInfo::MultiNode((
                    redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                    Some(redis::cluster_routing::ResponsePolicy::AllSucceeded),
                )),
            );
            // A user whose ACL leaves `PING` out is answered `NOPERM`: an answer.
            return match answer_in_time(timeout, ping).await {
                Err(why) if why.contains("NOPERM") => Ok(()),
                answered => answered.map(|_| ()),
            };
        };
        let mut pinged = self.masters_pinged.lock().await;
        pinged.retain(|probed| masters.iter().any(|(m, ..)| *m == probed.named));
        let mut verdict = Ok(());
        for (named, client, slot) in masters {
            let known = pinged.iter().position(|probed| probed.named == named);
            let (mut connection, key) = match known.map(|at| pinged.swap_remove(at)) {
                Some(probed) if probed.key.0 == slot => (probed.connection, probed.key),
                Some(probed) => (probed.connection, (slot, probe_key(prefix, slot))),
                None => {
                    // Connecting takes a handshake or two more than a call (TLS, AUTH).
                    let wait = settings::connect_timeout(timeout);
                    match answer_in_time(wait, RedisSettings::connect_for(&client, wait)).await {
                        Ok(connection) => (connection, (slot, probe_key(prefix, slot))),
                        Err(cause) => {
                            let hint = certificate_name_hint(&cause);
                            return Err(format!("{named}: {cause}{hint}"));
                        }
                    }
                }
            };
            let auth = self
                .nodes
                .direct
                .settings
                .still_authenticates(&mut connection);
            match tokio::time::timeout(timeout, auth).await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(format!("{named}: {why}")),
                Err(_) => return Err(format!("{named}: no answer within {timeout:?}")),
            }
            let command = redis::cmd("CLUSTER").arg("INFO").clone();
            let info = command.query_async::<String>(&mut connection);
            match tokio::time::timeout(timeout, info).await {
                Ok(Ok(info)) if info.contains("cluster_state:ok") => {}
                // It answered: its connection is kept for the next probe. Its script call
                // and write would be refused (CLUSTERDOWN) for what another master lacks:
                // the other masters are asked on, so that one that does not answer is the
                // one named.
                Ok(Ok(_)) => {
                    verdict = verdict.and(Err(format!("{named} says the cluster is down")));
                    pinged.push(ProbedMaster {
                        named,
                        connection,
                        key,
                    });
                    continue;
                }
                Ok(Err(error)) if error.code() == Some("NOPERM") => {}
                Ok(Err(error)) => return Err(format!("{named}: {error}")),
                Err(_) => return Err(format!("{named}: no answer within {timeout:?}")),
            }
            let run = self
                .nodes
                .probe_call(&mut connection, script, &key.1, timeout);
            if let Err(cause) = run.await {
                return Err(format!("{named}: {cause}"));
            }
            let write = super::batch::write_probe_answer(&mut connection, &key.1);
            match tokio::time::timeout(timeout, write).await {
                Ok(Ok(())) => {}
                // The slot moved since `CLUSTER SLOTS`: the next probe writes where it went.
                Ok(Err(error)) if redirected(&error) => {}
                Ok(Err(error)) => return Err(format!("{named}: a write: {error}")),
                Err(_) => return Err(format!("{named}: no answer within {timeout:?}")),
            }
            pinged.push(ProbedMaster {
                named,
                connection,
                key,
            });
        }
        verdict
    }
}

impl Cluster {
    /// Which master serves each slot, as `CLUSTER SLOTS` answered within `wait`, with the
    /// probe's connection. The map is read as requests read it (the node that answered
    /// last, then every master and seed at once, the first answer taken): the cluster
    /// client asks one node it holds a connection to at random, replicas included, and one
    /// that hangs (a replica stopped, a master frozen after its replica took over) would
    /// have the probe report a cluster that serves every request down, on and off.
    ///
    /// Not through the cluster client: while no node answers (a refused password, the
    /// cluster down), a question to it is sent again on its own up to 16 times, each after
    /// making connections to the seeds anew, and goes on after the probe has stopped
    /// waiting for it: about 140 connections a second to a seed from one idle gateway
    /// with a wrong password. Each seed's own answer says why instead.
    async fn slot_owners(&self, wait: Duration) -> Result<SlotOwners, String> {
        // Reading it may mean making a connection first.
        let read = self.nodes.read_slot_map(None, wait);
        let in_time = settings::connect_timeout(wait) + wait;
        if let Ok(Some(map)) = tokio::time::timeout(in_time, read).await {
            return Ok(map);
        }
        // Each seed node's own answer says why (a refused password, a closed port, not a
        // cluster, no slot served).
        Err(format!(
            "CLUSTER SLOTS: no node gave a slot map; {}",
            self.seeds_say(wait).await
        ))
    }

    /// The probe's cluster connection, made on first use: only for a master named without
    /// an address, which only the cluster client reaches.
    async fn probe_connection(&self) -> redis::cluster_async::ClusterConnection {
        self.probe
            .get_or_init(|| async {
                self.client
                    .get_pending_async_connection_with_config(self.config.clone())
            })
            .await
            .clone()
    }

    /// What each seed node answers `CLUSTER SLOTS` over a connection of its own, within
    /// `wait` (all asked at once), for the probe's message when the cluster client has no
    /// connection. Where seeds answer, the masters the first of them names are reached in
    /// turn (all at once), by the addresses it gives them, as the cluster client reaches
    /// them: where one cannot be (a certificate that names a hostname while the nodes
    /// announce their IP addresses), that is why.
    async fn seeds_say(&self, wait: Duration) -> String {
        let direct = &self.nodes.direct;
        let seeds = direct.settings.cluster_nodes().unwrap_or_default();
        // A connection of its own takes a handshake or two more than a call.
        let wait = settings::connect_timeout(wait);
        let mut asked = tokio::task::JoinSet::new();
        for (at, url) in seeds.into_iter().enumerate() {
            let settings = direct.settings.clone();
            asked.spawn(async move {
                let answer = answer_in_time(wait, async {
                    let client = settings.client_at(&url, true)?;
                    let mut connection = RedisSettings::connect_for(&client, wait).await?;
                    redis::cmd("CLUSTER")
                        .arg("SLOTS")
                        .query_async::<redis::Value>(&mut connection)
                        .await
                })
                .await;
                let (said, map) = match answer {
                    Ok(redis::Value::Array(ranges)) if ranges.is_empty() => {
                        (SERVES_NO_SLOT.to_owned(), None)
                    }
                    Ok(reply @ redis::Value::Array(_)) => {
                        ("answers".to_owned(), SlotOwners::parse(&reply))
                    }
                    Ok(other) => (bounded(&format!("{other:?}")).to_owned(), None),
                    Err(cause) => (not_a_cluster(bounded(&cause)), None),
                };
                // A URL holds no password (refused when the settings are read).
                (at, format!("seed {url}: {said}"), map)
            });
        }
        let mut said = asked.join_all().await;
        said.sort_by_key(|(at, ..)| *at);
        if said.iter().any(|(_, said, _)| said.ends_with(": answers")) {
            self.seed_answered.store(true, Ordering::Relaxed);
        }
        let first_map = said
            .iter_mut()
            .find_map(|(_, said, map)| Some((said, map.take()?)));
        if let Some((said, map)) = first_map {
            if let Some(why) = first_unreachable(&map, &direct.settings, direct.scheme, wait).await
            {
                said.push_str(&format!(", but {why}"));
            }
        }
        said.into_iter()
            .map(|(_, said, _)| said)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Whether a seed node has ever answered `CLUSTER SLOTS`: its URL's scheme (TLS or not)
    /// is then the one its port speaks.
    pub(super) fn seed_answered(&self) -> bool {
        self.seed_answered.load(Ordering::Relaxed)
    }

    /// A connection of its own to each master `CLUSTER SLOTS` names, by its name in logs
    /// (`master host:port`), or why there is none (named without an address, unreachable),
    /// for work that walks every master's keys: one master that cannot be reached leaves
    /// the others to walk.
    pub(super) async fn master_connections(
        &self,
        timeout: Duration,
    ) -> Result<Vec<(String, Result<MultiplexedConnection, String>)>, String> {
        let map = self
            .slot_owners(timeout.max(Duration::from_secs(1)))
            .await?;
        let mut connections = Vec::new();
        for (i, master) in map.masters.iter().enumerate() {
            let Some((host, port)) = master else {
                let unnamed = format!("master {i} (named without an address)");
                connections.push((unnamed, Err("no address to reach it by".to_owned())));
                continue;
            };
            let named = format!("master {host}:{port}");
            let url = settings::node_url(self.nodes.direct.scheme, host, *port);
            let connected = match self.nodes.direct.settings.client_at(&url, true) {
                Ok(client) => {
                    let wait = timeout.max(Duration::from_secs(1));
                    let connecting = RedisSettings::connect_for(&client, wait);
                    answer_in_time(wait, connecting).await
                }
                Err(error) => Err(error.to_string()),
            };
            // (The caller names the master beside its error.)
            connections.push((named, connected));
        }
        Ok(connections)
    }
}

/// What a node answering an empty slot map is told to be.
const SERVES_NO_SLOT: &str = "the node serves no slot and names no master (its cluster's slots \
     are not assigned yet, or it left its cluster): list nodes of a cluster whose slots are \
     assigned (`redis-cli --cluster create`)";

/// A master the probe asked: its name in logs (`master host:port`), the probe's connection
/// to it, and the probe's key in one of its slots (the slot, the key).
struct ProbedMaster {
    named: String,
    connection: MultiplexedConnection,
    key: (u16, String),
}

/// The probe's own key in `slot`: `{prefix:probe:N}`, with the first `N` whose hash tag
/// falls there (about 16,000 tries on average, once per master and slot map).
fn probe_key(prefix: &str, slot: u16) -> String {
    let head = format!("{prefix}:probe:");
    let mut crc = crc16::State::<crc16::XMODEM>::new();
    crc.update(head.as_bytes());
    let n = (0..1_000_000u32)
        .find(|n| {
            let mut tag = crc;
            tag.update(n.to_string().as_bytes());
            tag.get() % 16384 == slot
        })
        .unwrap_or_default();
    format!("{{{head}{n}}}")
}

/// A node's answer when asked for the slot map: the map, with the node's URL; or, where
/// there is none, why requests cannot be decided if the node is not part of a cluster.
type Asked = Result<(String, SlotOwners), Option<String>>;

/// Calls that decide the groups of many requests on one master at once.
pub(super) struct NodeCalls {
    /// Which master serves each slot, as the cluster last said; none until read, and
    /// again after a call found it stale.
    slots: ArcSwapOption<SlotOwners>,
    /// The slot map last read, kept when `slots` is let go: where a call through the
    /// gateway's own connections is sent first, and whom to ask for the map again.
    last_read_map: ArcSwapOption<SlotOwners>,
    /// When the slot map was last asked for ([`MonotonicClock`] nanoseconds).
    last_read: AtomicU64,
    /// Whether a read of the slot map is under way.
    reading: AtomicBool,
    /// Told when a read of the slot map ends.
    read_done: tokio::sync::Notify,
    /// The node whose answer the last read of the slot map took: asked first next time.
    last_answered: Mutex<Option<String>>,
    /// What a node said when asked for the slot map, while the last read found only
    /// servers that are not part of a cluster, or nodes that serve no slot: requests fail
    /// with it at once (as `on_error` says), rather than being decided on one server the
    /// probe reports down, or each waiting for the timeout.
    not_a_cluster: Mutex<Option<String>>,
    /// Until when ([`MonotonicClock`] nanoseconds) calls that only the cluster client could
    /// send are answered at once, and with what: it reached no node for the last one (the
    /// cluster down, a refused password). Each call sent through it meanwhile would make
    /// it connect to the seeds anew: about six connections per request.
    unreachable: Mutex<Option<(u64, String)>>,
    /// Whether the last read of the slot map found no node that gives one.
    map_unread: AtomicBool,
    /// Off once a server refused the flagged script (Redis before 7).
    supported: AtomicBool,
    /// The script with the `allow-cross-slot-keys` flag, and its SHA-1.
    code: String,
    sha: String,
    clock: MonotonicClock,
    direct: DirectMasters,
    /// Connections to the nodes calls of one hash tag went to lately (the master the slot
    /// map names, or the node `ASK` or `MOVED` named), shared by every thread, kept for
    /// the next such call: while a slot migrates, every call for a new key in it is
    /// answered `ASK`, and a connection per call would cost a handshake each (TCP, TLS,
    /// AUTH).
    redirected: Mutex<Vec<RedirectTarget>>,
    /// Per node (by URL): held while a connection to it is made.
    /// Each holds whether the last attempt ran out of time (a node that hangs).
    connects: Mutex<HashMap<String, Arc<tokio::sync::Mutex<bool>>>>,
    /// The nodes a call of one hash tag got no answer from in time, held back until it has
    /// run.
    late: Arc<LateNodes>,
}

/// Why [`NodeCalls::redirected_to`] gave no connection.
enum Unreached {
    /// None made within the time given (the node hangs, or is far away: the connect goes on).
    StillConnecting,
    /// Making one failed (refused, or the node's handshake failed).
    Failed,
}

/// A connection to a node a redirection named (by its URL), and when it was last used.
struct RedirectTarget {
    url: String,
    connection: MultiplexedConnection,
    used: std::time::Instant,
}

/// Most connections kept to nodes the slot map or a redirection named (one per master,
/// and a new master or two while slots move to it); beyond that, the one used least
/// lately is let go.
const REDIRECT_TARGETS_KEPT: usize = 64;

/// A connection of its own to each master, for the calls that go to one master: the
/// cluster client's routing (a task of its own between the caller and the node's
/// connection, its requests in flight polled on every step) cost the gateway more per
/// call than the rest of the call together (benches/README.md, "The gateway's side").
/// A call that finds its keys elsewhere, or cannot ask the master, makes the gateway read
/// the slot map again and leaves its jobs to be decided one call per hash tag
/// ([`call_by_tag`]).
pub(crate) struct DirectMasters {
    pub(crate) settings: RedisSettings,
    pub(crate) config: ConnectionManagerConfig,
    /// `redis` or `rediss`, as the seed nodes.
    pub(crate) scheme: &'static str,
}

/// Which master serves each slot: an index per slot into the masters `CLUSTER SLOTS` named.
struct SlotOwners {
    owner: Vec<u16>,
    /// Each master's address, as `CLUSTER SLOTS` gave it (none where it gave no host).
    masters: Vec<Option<(String, u16)>>,
}

impl SlotOwners {
    /// Reads a `CLUSTER SLOTS` reply: `[start, end, [host, port, ...], replicas...]` per range.
    /// A reply naming no master is no map: a node whose slots are not assigned yet, or one
    /// that left its cluster (`CLUSTER RESET`), answers that at once, and taken it would
    /// send every call down the one-per-hash-tag path for good.
    fn parse(reply: &redis::Value) -> Option<Self> {
        use redis::Value;
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut owner = vec![u16::MAX; SLOTS];
        let mut masters: Vec<(Value, Value)> = Vec::new();
        for range in ranges {
            let Value::Array(fields) = range else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let address = (master.first()?.clone(), master.get(1)?.clone());
            let index = match masters.iter().position(|m| *m == address) {
                Some(index) => index,
                None => {
                    masters.push(address);
                    masters.len() - 1
                }
            };
            let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
            for slot in owner.get_mut(start..=end)? {
                *slot = u16::try_from(index).ok()?;
            }
        }
        let masters = masters
            .into_iter()
            .map(|(host, port)| {
                let host = match host {
                    Value::BulkString(bytes) => String::from_utf8(bytes).ok()?,
                    Value::SimpleString(host) => host,
                    _ => return None,
                };
                let Value::Int(port) = port else { return None };
                // An empty host is "the node you asked", which this map does not record;
                // `?`, a node with no name of the preferred endpoint type.
                // Anything else no host name is (a node's answer gone wrong) is no address
                // either.
                host_name_like(&host).then_some((host, u16::try_from(port).ok()?))
            })
            .collect::<Vec<_>>();
        (!masters.is_empty()).then_some(SlotOwners { owner, masters })
    }

    /// The address of the master serving `slot`, by this map.
    fn master(&self, slot: u16) -> Option<&(String, u16)> {
        let index = *self.owner.get(usize::from(slot))?;
        self.masters.get(usize::from(index))?.as_ref()
    }

    /// The URL of each master this map names (`scheme`: `redis` or `rediss`).
    fn master_urls<'a>(&'a self, scheme: &'a str) -> impl Iterator<Item = String> + 'a {
        let masters = self.masters.iter().flatten();
        masters.map(move |(host, port)| settings::node_url(scheme, host, *port))
    }
}

impl NodeCalls {
    fn new(direct: DirectMasters) -> Self {
        let code = format!("#!lua flags=allow-cross-slot-keys\n{}", SCRIPT);
        let sha = redis::Script::new(&code).get_hash().to_owned();
        NodeCalls {
            slots: ArcSwapOption::empty(),
            last_read_map: ArcSwapOption::empty(),
            last_read: AtomicU64::new(0),
            reading: AtomicBool::new(false),
            read_done: tokio::sync::Notify::new(),
            last_answered: Mutex::new(None),
            not_a_cluster: Mutex::new(None),
            unreachable: Mutex::new(None),
            map_unread: AtomicBool::new(false),
            supported: AtomicBool::new(true),
            code,
            sha,
            clock: MonotonicClock::default(),
            direct,
            redirected: Mutex::new(Vec::new()),
            connects: Mutex::new(HashMap::new()),
            late: Arc::default(),
        }
    }

    /// A connection to the node at `url` (a master of the slot map, or one a redirection
    /// named): the one kept from an earlier call (after a PING if it sat idle, as a master's
    /// connection, answered by `ping_until`), or a new one, made by one task at a time per
    /// node (a burst of calls after a restart would each make its own). `wait` bounds the wait
    /// for the connect. The connect itself is given the time making a connection may take, in a task
    /// of its own, and kept for the next call even where this one stopped waiting first: a
    /// node more than `wait` away is reached that way.
    async fn redirected_to(
        self: &Arc<Self>,
        url: &str,
        wait: Duration,
        ping_until: tokio::time::Instant,
    ) -> Result<MultiplexedConnection, Unreached> {
        let deadline = tokio::time::Instant::now() + wait;
        if let Some(connection) = self.kept_connection(url, ping_until).await {
            return Ok(connection);
        }
        let gate = {
            let mut connects = self.connects.lock().unwrap_or_else(|e| e.into_inner());
            connects.entry(url.to_owned()).or_default().clone()
        };
        if let Ok(mut alone) = gate.clone().try_lock_owned() {
            let (nodes, url) = (self.clone(), url.to_owned());
            tokio::spawn(async move {
                *alone = nodes.make_kept(&url).await;
            });
        }
        let hung = tokio::time::timeout_at(deadline, gate.lock())
            .await
            .map_err(|_| Unreached::StillConnecting)?;
        if let Some(connection) = self.kept_connection(url, deadline).await {
            return Ok(connection);
        }
        // A node that hangs is not a node gone: the cluster client would reach it too.
        Err(match *hung {
            true => Unreached::StillConnecting,
            false => Unreached::Failed,
        })
    }

    /// Makes a connection to the node at `url`, kept for the calls there; whether the
    /// attempt ran out of time.
    async fn make_kept(&self, url: &str) -> bool {
        let Ok(client) = self.direct.settings.client_at(url, true) else {
            return false;
        };
        let connect = settings::connect_timeout(self.direct.settings.timeout);
        let made = tokio::time::timeout(connect, RedisSettings::connect_for(&client, connect));
        let connection = match made.await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return error.is_timeout(),
            Err(_) => return true,
        };
        let mut kept = self.redirected.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|node| node.url != url);
        if kept.len() >= REDIRECT_TARGETS_KEPT {
            if let Some(oldest) = (0..kept.len()).min_by_key(|&i| kept[i].used) {
                kept.swap_remove(oldest);
            }
        }
        kept.push(RedirectTarget {
            url: url.to_owned(),
            connection,
            used: std::time::Instant::now(),
        });
        false
    }

    /// The connection kept to the node at `url`, if any, checked with a PING (answered by
    /// `deadline`) if it sat idle; one that does not answer is let go.
    async fn kept_connection(
        &self,
        url: &str,
        deadline: tokio::time::Instant,
    ) -> Option<MultiplexedConnection> {
        let (mut connection, idle) = {
            let mut kept = self.redirected.lock().unwrap_or_else(|e| e.into_inner());
            let node = kept.iter_mut().find(|node| node.url == url)?;
            let idle = node.used.elapsed() >= IDLE_CHECK;
            node.used = std::time::Instant::now();
            (node.connection.clone(), idle)
        };
        if !idle {
            return Some(connection);
        }
        let pinged = tokio::time::timeout_at(deadline, super::keep_alive::ping(&mut connection));
        match pinged.await {
            Ok(Ok(())) => return Some(connection),
            // A broken connection: made anew.
            Ok(Err(error)) if !error.is_timeout() => {}
            // No answer in time (a stall): held back as after a late call, until a PING on
            // this connection comes back ([`LateNodes`]).
            _ => self.late.hold(url, connection),
        }
        self.forget_redirected(url);
        None
    }

    /// Lets go of the connection kept to the node at `url` (it failed).
    fn forget_redirected(&self, url: &str) {
        let mut kept = self.redirected.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|node| node.url != url);
    }

    /// Places the groups of `walk` not decided yet on their masters by the slot map as it
    /// is now (a map read again may number the masters differently): none without a map,
    /// for a slot no master serves, or where Redis before 7 runs no flagged script (a group
    /// is a call of its own there, [`call_by_tag`]).
    fn place(&self, walk: &mut Walk) {
        let map = self.slots.load();
        let map = map
            .as_ref()
            .filter(|_| self.supported.load(Ordering::Relaxed));
        walk.place(|slot| {
            let map = map?;
            let owner = map.owner[usize::from(slot)];
            (owner != u16::MAX).then_some(owner)
        });
    }

    /// The slot map, or none (none either where Redis before 7 runs no flagged script);
    /// asks the cluster for it (in the background, one read at a time, at most every
    /// [`SLOT_MAP_INTERVAL_NS`]) when there is none. With Redis before 7 the map is kept too:
    /// it says where calls of one hash tag go first.
    fn slot_map(
        self: &Arc<Self>,
        connection: &redis::cluster_async::ClusterConnection,
        timeout: Duration,
    ) -> Option<Arc<SlotOwners>> {
        let map = self.slots.load_full();
        if map.is_none() {
            self.read_again(connection, timeout);
        }
        map.filter(|_| self.supported.load(Ordering::Relaxed))
    }

    /// Asks the cluster for its slot map in the background (one read at a time, at most
    /// every [`SLOT_MAP_INTERVAL_NS`]), keeping the map there is until the answer comes.
    fn read_again(
        self: &Arc<Self>,
        connection: &redis::cluster_async::ClusterConnection,
        timeout: Duration,
    ) {
        let now = self.clock.now();
        let last = self.last_read.load(Ordering::Relaxed);
        // (`last` is 0 before the first read, which the clock's first 200 ms must not hold
        // back.)
        if (last == 0 || now.saturating_sub(last) >= SLOT_MAP_INTERVAL_NS)
            && !self.reading.swap(true, Ordering::Acquire)
        {
            self.last_read.store(now.max(1), Ordering::Relaxed);
            let nodes = self.clone();
            let connection = connection.clone();
            tokio::spawn(async move {
                // Done reading however the task ends (a runtime shut down under it too).
                let _reading = Reading(&nodes.reading, &nodes.read_done);
                // Reading it may mean making a connection first.
                let wait = settings::connect_timeout(timeout) + timeout;
                let read =
                    tokio::time::timeout(wait, nodes.read_slot_map(Some(connection), timeout));
                if let Ok(Some(map)) = read.await {
                    let map = Arc::new(map);
                    nodes.last_read_map.store(Some(map.clone()));
                    let urls: Vec<String> = map.master_urls(nodes.direct.scheme).collect();
                    nodes.late.keep_only(&urls);
                    nodes.slots.store(Some(map));
                }
            });
        }
    }

    /// `CLUSTER SLOTS` (a map that names no master is no answer, see [`SlotOwners::parse`])
    /// over the gateway's own connections: first of the node whose answer the last read took; if it has not
    /// answered within a quarter of the timeout (or fails, or there is none), of every
    /// other master the map last read names and every seed node at once; the first answer
    /// taken (a master that hangs, or an address no longer anyone's, is not waited for,
    /// and a healthy cluster is asked once per read, not once per node). Then, for a
    /// request's read, through `connection` (its thread's cluster client, which sends
    /// nothing again on its own), the last resort: while that client reads the map again
    /// itself (after a `MOVED`) it holds every command sent through it.
    async fn read_slot_map(
        self: &Arc<Self>,
        connection: Option<redis::cluster_async::ClusterConnection>,
        timeout: Duration,
    ) -> Option<SlotOwners> {
        let mut urls = self.direct.settings.cluster_nodes().unwrap_or_default();
        if let Some(map) = self.last_read_map.load_full() {
            for url in map.master_urls(self.direct.scheme) {
                if !urls.contains(&url) {
                    urls.insert(0, url);
                }
            }
        }
        let first = self.last_answered.lock().map(|g| g.clone()).unwrap_or(None);
        // What a node said if it is not part of a cluster: kept only if no node answers.
        let mut not_a_cluster = None;
        let mut read = |answer: Result<Asked, tokio::task::JoinError>| match answer {
            Ok(Ok((url, map))) => {
                if let Ok(mut last) = self.last_answered.lock() {
                    *last = Some(url);
                }
                Some(map)
            }
            Ok(Err(Some(why))) => {
                not_a_cluster = Some(why);
                None
            }
            _ => None,
        };
        // Dropped with the first answer: the others are not waited for.
        let mut asked = tokio::task::JoinSet::new();
        let mut map = None;
        if let Some(first) = first.filter(|url| urls.contains(url)) {
            urls.retain(|url| *url != first);
            asked.spawn(self.clone().ask_slot_map(first, timeout));
            if let Ok(Some(answer)) = tokio::time::timeout(timeout / 4, asked.join_next()).await {
                map = read(answer);
            }
        }
        if map.is_none() {
            for url in urls {
                asked.spawn(self.clone().ask_slot_map(url, timeout));
            }
            while let Some(answer) = asked.join_next().await {
                map = read(answer);
                if map.is_some() {
                    break;
                }
            }
        }
        if let Some(mut connection) = connection.filter(|_| map.is_none()) {
            let ask = connection.route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            );
            map = ask.await.ok().as_ref().and_then(SlotOwners::parse);
        }
        if let Ok(mut known) = self.not_a_cluster.lock() {
            *known = if map.is_some() { None } else { not_a_cluster };
        }
        self.map_unread.store(map.is_none(), Ordering::Relaxed);
        map
    }

    /// The slot map as the node at `url` answers it, within `timeout`, with the URL; or, if
    /// it says it is not part of a cluster or serves no slot, why requests cannot be
    /// decided.
    async fn ask_slot_map(self: Arc<Self>, url: String, timeout: Duration) -> Asked {
        let ask = async {
            let connect = settings::connect_timeout(timeout);
            let until = tokio::time::Instant::now() + connect;
            let connected = self.redirected_to(&url, connect, until).await;
            let mut node = connected.map_err(|_| None)?;
            let command = redis::cmd("CLUSTER").arg("SLOTS").clone();
            match command.query_async::<redis::Value>(&mut node).await {
                Ok(redis::Value::Array(ranges)) if ranges.is_empty() => {
                    Err(Some(format!("CLUSTER SLOTS: {SERVES_NO_SLOT}")))
                }
                Ok(reply) => SlotOwners::parse(&reply).ok_or(None),
                Err(error) => {
                    if !matches!(error.kind(), redis::ErrorKind::Server(_)) {
                        self.forget_redirected(&url);
                    }
                    let said = error.to_string();
                    Err(said
                        .contains("cluster support disabled")
                        .then(|| not_a_cluster(&format!("CLUSTER SLOTS: {}", bounded(&said)))))
                }
            }
        };
        // Asking may mean making a connection first.
        let map = tokio::time::timeout(settings::connect_timeout(timeout) + timeout, ask)
            .await
            .map_err(|_| None)??;
        Ok((url, map))
    }

    /// Why a call only the cluster client could send is not sent, for
    /// [`UNREACHABLE_PAUSE`] after it reached no node for one.
    fn unreachable(&self) -> Option<String> {
        let now = self.clock.now();
        let unreachable = self.unreachable.lock().ok()?;
        let (until, why) = unreachable.as_ref()?;
        (now < *until).then(|| why.clone())
    }

    /// The cluster client answered a call with `error`: if it reached no node, the calls
    /// after it are not sent through it for [`UNREACHABLE_PAUSE`].
    fn sent_through_client(&self, error: &redis::RedisError) {
        // "No connection" also while the client is still making one to a node far away:
        // counted as none reached only while no node gives a slot map either.
        let no_connection =
            error.kind() == redis::ErrorKind::ClusterConnectionNotFound || error.is_io_error();
        let reached_none = error.kind() == redis::ErrorKind::AuthenticationFailed
            || error.is_connection_refusal()
            || (no_connection && self.map_unread.load(Ordering::Relaxed));
        if !reached_none {
            return;
        }
        let until = self.clock.now() + UNREACHABLE_PAUSE.as_nanos() as u64;
        if let Ok(mut unreachable) = self.unreachable.lock() {
            let why = format!("no node of the cluster reached: {error}");
            *unreachable = Some((until, why));
        }
    }

    /// Why requests cannot be decided, while the seed nodes said they are not part of a
    /// cluster, or serve no slot.
    fn not_a_cluster(&self) -> Option<String> {
        self.not_a_cluster.lock().ok()?.clone()
    }

    /// The URL of the master that serves `slot` by the slot map, or by the map last read.
    fn master_url(&self, slot: u16) -> Option<String> {
        let map = self
            .slots
            .load_full()
            .or_else(|| self.last_read_map.load_full())?;
        let (host, port) = map.master(slot)?;
        Some(settings::node_url(self.direct.scheme, host, *port))
    }

    /// Calls of one hash tag from now on, for every request: a master refused the call
    /// for several slots (`error`, logged the first time).
    fn decide_by_tag(&self, error: &redis::RedisError) {
        if self.supported.swap(false, Ordering::Relaxed) {
            tracing::info!(target: "reset_guard::limit", %error, "the cluster cannot run one call per node; deciding one hash tag at a time");
        }
    }

    /// The probe's call of the script for no request on a master, shaped as a request's
    /// call is: while masters take one call for several slots, a master's batch (the
    /// flagged script, `key` passed as an argument); otherwise a call of one hash tag,
    /// `key` declared (`plain`, the script without flags). Where a master refuses the
    /// batch in words the requests' calls do not know (Redis before 7 does not compile the
    /// flags; a proxy may refuse a call that declares no key, in words or a code of its
    /// own) but answers the call of one hash tag, the calls go one hash tag at a time from
    /// then on. Where it refuses both (an ACL user without a command the script runs), that
    /// is the probe's failure, and nothing changes once it answers again. A slot on the
    /// move (`[-1]`, `MOVED`, `ASK`) is an answer.
    async fn probe_call(
        &self,
        connection: &mut impl redis::aio::ConnectionLike,
        plain: &redis::Script,
        key: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let keys = [key.to_owned()];
        let by_tag = CallArgs::for_nothing(&keys).declared(plain.get_hash());
        if !self.supported.load(Ordering::Relaxed) {
            return match super::batch::script_answer(connection, plain, &by_tag, timeout).await? {
                Ok(reply) => super::batch::answered_for_nothing(&reply),
                Err(error) if redirected(&error) => Ok(()),
                Err(error) => Err(format!("the rate-limit script: {error}")),
            };
        }
        let flagged = redis::Script::new(&self.code);
        let command = CallArgs::for_nothing(&keys).undeclared(&self.sha);
        let refused =
            match super::batch::script_answer(connection, &flagged, &command, timeout).await? {
                Ok(reply) => return super::batch::answered_for_nothing(&reply),
                Err(error) if redirected(&error) => return Ok(()),
                // No answer of the server's own (a dropped connection), or a refusal of the
                // moment: the probe's failure.
                Err(error) if error.code().is_none() || passing_refusal(&error) => {
                    return Err(format!("the rate-limit script: {error}"))
                }
                Err(error) => error,
            };
        match super::batch::script_answer(connection, plain, &by_tag, timeout).await? {
            Ok(reply) if super::batch::answered_for_nothing(&reply).is_ok() => {
                self.decide_by_tag(&refused);
                Ok(())
            }
            Err(error) if redirected(&error) => {
                self.decide_by_tag(&refused);
                Ok(())
            }
            _ => Err(format!("the rate-limit script: {refused}")),
        }
    }

    /// One call deciding `batch`, every job of which has its keys on the master that serves
    /// `slot` (by the slot map), over this task's own connection to that master. `Ok(None)`:
    /// the call decided nothing (a key not served there, the flagged script refused, or the
    /// master could not be asked), so the jobs are to be decided slot by slot.
    async fn call(
        &self,
        batch: &[Job],
        slot: u16,
        master: &mut Option<((String, u16), ConnectionManager)>,
    ) -> Result<Option<Vec<i64>>, String> {
        if !self.supported.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let map = self.slots.load_full();
        let Some(address) = map.as_ref().and_then(|map| map.master(slot)) else {
            return Ok(None);
        };
        if master.as_ref().is_none_or(|(known, _)| known != address) {
            let url = settings::node_url(self.direct.scheme, &address.0, address.1);
            // An address no URL can name (a zone in an IPv6 address, say) leaves these
            // jobs to be decided one call per hash tag.
            let client = self.direct.settings.client_at(&url, true);
            let connection = client.and_then(|client| {
                ConnectionManager::new_lazy_with_config(client, self.direct.config.clone())
            });
            let Ok(connection) = connection else {
                return Ok(None);
            };
            *master = Some((address.clone(), connection));
        }
        let Some((_, connection)) = master.as_mut() else {
            return Ok(None);
        };
        let args = CallArgs::new(batch);
        let command = args.undeclared(&self.sha);
        let mut load_tried = false;
        loop {
            match command.query_async::<redis::Value>(connection).await {
                Ok(value) => {
                    let values = numbers(value)?;
                    if values == [-1] {
                        // A slot moved: read the map again before the next such call.
                        self.slots.store(None);
                        return Ok(None);
                    }
                    return Ok(Some(values));
                }
                Err(error)
                    if error.kind()
                        == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                        && !load_tried =>
                {
                    load_tried = true;
                    let load = redis::cmd("SCRIPT").arg("LOAD").arg(&self.code).clone();
                    match load.query_async::<redis::Value>(connection).await {
                        Ok(_) => {}
                        // Redis before 7 knows no script flags (its compiler refuses the
                        // first line): decide slot by slot from now on.
                        Err(error) if error.to_string().contains("compiling") => {
                            self.decide_by_tag(&error);
                            return Ok(None);
                        }
                        // Anything else (a node loading its data, a dropped connection)
                        // passes: these jobs go slot by slot, the next call tries again.
                        Err(_) => return Ok(None),
                    }
                }
                // A proxy in front of the nodes (a managed service's: ElastiCache
                // Serverless) that routes a script call by its declared keys, and refuses
                // one with none before it runs: decide one hash tag at a time from now on,
                // every key of such a call declared and in one slot. (Refused in other
                // words, the probe's call finds it, within a second.)
                Err(error) if refuses_calls_without_keys(&error) => {
                    self.decide_by_tag(&error);
                    return Ok(None);
                }
                Err(error) if error.is_timeout() => {
                    // No answer in time: the master may have stalled, and run the call
                    // later, or have been replaced. The caller holds it back until it
                    // answers, or the slot map, read again, names another.
                    return Err(LATE_MASTER.to_owned());
                }
                Err(error) => {
                    // The master failed over, went or came back: connect anew.
                    *master = None;
                    if refused_before_running(&error) {
                        // Nothing ran (CLUSTERDOWN, READONLY, LOADING, MOVED..., or no
                        // connection): read the map again; `call_by_tag` waits, follows and
                        // sends these jobs again.
                        self.slots.store(None);
                        return Ok(None);
                    }
                    // Anything else (a connection dropped after the call was written, a
                    // reply not understood) may come after the script ran: sent again,
                    // these requests would be charged twice. `on_error` decides them. After
                    // a dropped connection the slot map stays: the next call goes to a new
                    // connection to the same master.
                    return Err(error.to_string());
                }
            }
        }
    }
}

/// A cluster store's queues on one thread: the store's id, a weak handle to them, and the
/// release of the store's hold on them.
type QueuesOfThread = (u64, Weak<ThreadQueues>, held::Release<Arc<ThreadQueues>>);

thread_local! {
    /// Per thread: each cluster store's queues on this thread. Weak: the store holds them
    /// (`Cluster::held_queues`) until the entry's `Release` goes with the entry or the
    /// thread (held.rs).
    static CLUSTER_QUEUES: std::cell::RefCell<Vec<QueuesOfThread>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A master's queue on one thread, and when its task (and connection) was started.
type MasterQueue = (mpsc::Sender<Job>, tokio::time::Instant);

/// One thread's queues to a cluster: one per master (by its index in the slot map), each
/// with a task making that master's calls, started on first use; and one for the jobs
/// whose master is not known (no slot map when their request started), which go where the
/// map places them once read, or are decided one call per hash tag. Each holds at most
/// [`QUEUE_LIMIT`] jobs; beyond that a request fails at once, as `on_error` says.
struct ThreadQueues {
    unplaced: mpsc::Sender<Job>,
    masters: Mutex<Vec<Option<MasterQueue>>>,
    /// How many of the masters' tasks have had a call answered: while some master has not,
    /// a request may be one a connection is made for, and wait as long as that may take
    /// (four times `timeout`, at least 250 ms) rather than `timeout` ([`Self::connecting`]).
    connected: AtomicUsize,
    /// When these queues were made.
    made: tokio::time::Instant,
    connection: redis::cluster_async::ClusterConnection,
    nodes: Arc<NodeCalls>,
    script: Arc<redis::Script>,
    timeout: Duration,
}

impl ThreadQueues {
    /// Whether this thread's first connections may still be in the making: none of its
    /// masters' tasks has had a call answered, within the time making a connection may
    /// take from when these queues were made ([`Self::connected`]).
    fn young(&self) -> bool {
        self.connected.load(Ordering::Relaxed) == 0
            && self.made.elapsed() < settings::connect_timeout(self.timeout)
    }

    /// Whether a request charging `charges` may be one that a connection to a master is
    /// made for: these queues are [young](Self::young), or not every master the slot map
    /// names has had a call answered here, and a master this request's keys are on has no
    /// task on this thread yet, or one started within the time making a connection may
    /// take. (Only the request's own masters: a master this thread's traffic never
    /// reaches must not lengthen every request's wait.)
    fn connecting(&self, nodes: &NodeCalls, specs: &RedisSpecs, charges: &Charges) -> bool {
        if self.young() {
            return true;
        }
        // Where Redis before 7 runs no flagged script, a thread may never start a master's
        // task (every call goes one hash tag at a time, over connections made apart from
        // the request's wait): its requests would always wait as if connecting.
        if !nodes.supported.load(Ordering::Relaxed) {
            return false;
        }
        let map = nodes.slots.load();
        let Some(map) = map.as_ref() else {
            return false;
        };
        if self.connected.load(Ordering::Relaxed) >= map.masters.len() {
            return false;
        }
        let owners = charges
            .as_slice()
            .iter()
            .map(|(group, hash)| map.owner[usize::from(specs.slot(*group, *hash))]);
        let masters = self.masters.lock().unwrap_or_else(|e| e.into_inner());
        reaches_a_new_master(owners, &masters, settings::connect_timeout(self.timeout))
    }

    /// Hands `job` to its master's queue when the slot map placed it, else to be placed.
    fn enqueue(self: &Arc<Self>, job: Job, owner: Option<u16>) -> Result<(), String> {
        let job = match owner {
            Some(owner) => match self.to_master(job, owner) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(_)) => return Err(QUEUE_FULL.to_owned()),
                // The master's task stopped (its runtime is shutting down): as if unplaced.
                Err(TrySendError::Closed(job)) => job,
            },
            None => job,
        };
        self.unplaced.try_send(job).map_err(|error| match error {
            TrySendError::Full(_) => QUEUE_FULL.to_owned(),
            TrySendError::Closed(_) => "the Redis worker stopped".to_owned(),
        })
    }

    /// Hands `job` to the queue of master `owner` on this thread, whose task starts on
    /// first use; gives the job back if the queue is full or its task has stopped. (The job
    /// is moved either way; boxing it would cost an allocation per run.)
    #[allow(clippy::result_large_err)]
    fn to_master(self: &Arc<Self>, job: Job, owner: u16) -> Result<(), TrySendError<Job>> {
        let mut masters = self.masters.lock().unwrap_or_else(|e| e.into_inner());
        let index = usize::from(owner);
        if masters.len() <= index {
            masters.resize(index + 1, None);
        }
        // A task that stopped (it panicked) is replaced.
        if masters[index]
            .as_ref()
            .is_some_and(|(sender, _)| sender.is_closed())
        {
            masters[index] = None;
        }
        let (sender, _) = masters[index].get_or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(QUEUE_LIMIT);
            tokio::spawn(run_master_batches(receiver, Arc::downgrade(self)));
            (sender, tokio::time::Instant::now())
        });
        sender.try_send(job)
    }
}

/// Whether one of `owners` (the masters a request's keys are on, by index in the slot map;
/// `u16::MAX`: none) has no task in `masters` yet, or one started within `window`: a master
/// a connection may still be being made to.
fn reaches_a_new_master(
    owners: impl IntoIterator<Item = u16>,
    masters: &[Option<MasterQueue>],
    window: Duration,
) -> bool {
    owners.into_iter().any(|owner| {
        let task = masters.get(usize::from(owner)).and_then(Option::as_ref);
        owner != u16::MAX && task.is_none_or(|(_, at)| at.elapsed() < window)
    })
}

/// The jobs whose master the request did not know: those the slot map (read now if there
/// was none) places on a master go to that master's queue on this thread; the others are
/// decided one call per hash tag at once, side by side over the cluster connection.
async fn run_unplaced(mut queue: mpsc::Receiver<Job>, queues: Weak<ThreadQueues>) {
    while let Some(first) = queue.recv().await {
        let mut by_tag = gather(first, &mut queue);
        let Some(queues) = queues.upgrade() else {
            answer(by_tag, Err("the Redis worker stopped".to_owned()));
            continue;
        };
        let mut map = queues.nodes.slot_map(&queues.connection, queues.timeout);
        if map.is_none() && queues.young() {
            // This thread's first requests: the map being read (over connections of the
            // gateway's own, given the time making one takes) is waited for, rather than
            // sending them through the cluster client, whose connection may still be in
            // the making and is given only the timeout of a call.
            let done = queues.nodes.read_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if queues.nodes.reading.load(Ordering::Acquire) {
                let wait = settings::connect_timeout(queues.timeout);
                let _ = tokio::time::timeout(wait, done).await;
                map = queues.nodes.slot_map(&queues.connection, queues.timeout);
            }
        }
        if let Some(map) = map {
            let mut rest = Vec::new();
            for job in by_tag {
                let (group, hash) = job.charges.as_slice()[0];
                match map.owner[usize::from(job.specs.slot(group, hash))] {
                    u16::MAX => rest.push(job),
                    owner => match queues.to_master(job, owner) {
                        Ok(()) => {}
                        Err(TrySendError::Full(job)) => {
                            job.reply.send(Err(QUEUE_FULL.to_owned()));
                        }
                        Err(TrySendError::Closed(job)) => rest.push(job),
                    },
                }
            }
            by_tag = rest;
        } else if let Some(said) = queues.nodes.not_a_cluster() {
            answer(by_tag, Err(said));
            continue;
        }
        by_tags(by_tag, &queues);
    }
}

/// Why a call was not decided: its master did not answer it in time.
const LATE_MASTER: &str = "timed out";

/// One master's calls from one thread: whatever jobs wait for it go as one call over this
/// task's own connection to the master, one call at a time, so that under load the calls
/// grow rather than multiply (as in the other modes). Each decided job's walk goes on to
/// its next run's master ([`hand_on`]); a call that finds its keys no longer served there
/// hands its jobs back to be decided one call per hash tag ([`call_by_tag`]).
async fn run_master_batches(mut queue: mpsc::Receiver<Job>, queues: Weak<ThreadQueues>) {
    let Some((nodes, timeout)) = queues.upgrade().map(|q| (q.nodes.clone(), q.timeout)) else {
        return;
    };
    // This task's connection to the master, and the master's address.
    let mut master: Option<((String, u16), ConnectionManager)> = None;
    // The connection of a call that got no answer in time, and its master's address.
    let mut late: Option<((String, u16), ConnectionManager)> = None;
    let mut refusal = Refusal::default();
    let mut keep_alive = KeepAlive::new();
    // Whether a call of this task has been answered yet ([`ThreadQueues::connected`]).
    let mut connected = false;
    loop {
        let connection = master.as_ref().map(|(_, connection)| connection);
        let Some(first) = keep_alive.next_job(&mut queue, connection, timeout).await else {
            return;
        };
        // The first job's sender woke this task, which the runtime may run next, before
        // the other requests answered by the same reply have sent theirs: let them.
        tokio::task::yield_now().await;
        let mut batch = gather(first, &mut queue);
        // Whether `address` is the master the slot map names for this batch, whose
        // connection the call uses (another, from before the map changed, is replaced by
        // the call).
        let named = |batch: &[Job], address: &(String, u16)| {
            batch.first().is_some_and(|job| {
                let (group, hash) = job.charges.as_slice()[0];
                let map = nodes.slots.load_full();
                let slot = job.specs.slot(group, hash);
                map.is_some_and(|map| map.master(slot) == Some(address))
            })
        };
        // After a call its master did not answer in time: Redis runs every call it has
        // received, however late, so calls sent to a master that stalled would all charge
        // their requests once it resumes, though each was answered as `on_error` says.
        // Nothing more goes to it (nor through the cluster client: the slot map is kept,
        // and read again in the background to follow a failover) until a PING on that
        // connection comes back, behind the late call; the requests meanwhile are answered
        // as `on_error` says, and charged nowhere. Once the map names another master for
        // these slots, the stalled one no longer counts.
        let replaced = |batch: &[Job], address: &(String, u16)| {
            nodes
                .slots
                .load_full()
                .is_some_and(|_| !named(batch, address))
        };
        if late
            .as_ref()
            .is_some_and(|(address, _)| replaced(&batch, address))
        {
            late = None;
        }
        if let Some((_, connection)) = &late {
            if let Some(why) = refusal.recent() {
                answer(batch, Err(why));
                continue;
            }
            let until = tokio::time::Instant::now() + settings::connect_timeout(timeout);
            let mut pinged = ping_by(connection.clone(), until).await;
            if refused_at_once(&pinged) {
                // A broken connection, which the client has begun to make anew.
                pinged = ping_by(connection.clone(), until).await;
            }
            batch.retain(|job| !job.reply.is_closed());
            match pinged {
                Ok(Ok(())) => {
                    keep_alive.liveness.answered();
                    master = late.take();
                }
                failed => {
                    let why = why_not(failed, true);
                    answer(batch, Err(why.clone()));
                    refusal.record(why);
                    if let Some(queues) = queues.upgrade() {
                        queues.nodes.read_again(&queues.connection, timeout);
                    }
                    continue;
                }
            }
        }
        if let Some((_, connection)) = master
            .as_mut()
            .filter(|_| keep_alive.liveness.silent())
            .filter(|(address, _)| named(&batch, address))
        {
            // Nothing has answered for a while (the background PINGs failed: the master
            // restarted, or closed the connection): a PING finds out before a script is
            // sent that a closed connection would fail (a failure that cannot tell
            // whether the script ran). As in the other modes.
            let until = tokio::time::Instant::now() + settings::connect_timeout(timeout);
            let pinged = ping_by(connection.clone(), until).await;
            match &pinged {
                Ok(Ok(())) => keep_alive.liveness.answered(),
                Ok(Err(error)) if !error.is_timeout() => master = None,
                // No answer in time: held back as a late call's master is (the map read
                // again: it may have been replaced).
                _ => {
                    late = master.take();
                    refusal.record(LATE_CALL.to_owned());
                    if let Some(queues) = queues.upgrade() {
                        queues.nodes.read_again(&queues.connection, timeout);
                    }
                    answer(batch, Err(LATE_MASTER.to_owned()));
                    continue;
                }
            }
            batch.retain(|job| !job.reply.is_closed());
        }
        let Some(job) = batch.first() else {
            continue;
        };
        let (group, hash) = job.charges.as_slice()[0];
        let slot = job.specs.slot(group, hash);
        keep_alive.sent();
        // The first call makes the connection too (the requests' own deadline allows
        // for it: [`ThreadQueues::connected`]).
        let wait = match keep_alive.liveness.silent() {
            true => settings::connect_timeout(timeout),
            false => timeout,
        };
        let decided = tokio::time::timeout(wait, nodes.call(&batch, slot, &mut master))
            .await
            .unwrap_or_else(|_| Err(LATE_MASTER.to_owned()));
        if matches!(&decided, Err(why) if why == LATE_MASTER) {
            // A master that stops answering without closing its connection: held back
            // (above) until it answers, or the slot map, read again, names another.
            late = master.take();
            if let Some(queues) = queues.upgrade() {
                queues.nodes.read_again(&queues.connection, timeout);
            }
        }
        if let Ok(Some(_)) = decided {
            keep_alive.liveness.answered();
            if !connected {
                connected = true;
                if let Some(queues) = queues.upgrade() {
                    queues.connected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        match (decided, queues.upgrade()) {
            (Ok(Some(values)), Some(queues)) => hand_on(batch, values, &queues),
            (Ok(None), Some(queues)) => by_tags(batch, &queues),
            (Ok(Some(values)), None) => answer(batch, Ok(values)),
            (Ok(None), None) => answer(batch, Err("the Redis worker stopped".to_owned())),
            (Err(error), _) => answer(batch, Err(error)),
        }
    }
}

/// Each job of a decided batch sent on with its numbers: a walk that has not ended, whose
/// next run the slot map placed on a master, goes straight to that master's queue on this
/// thread; every other job goes back to its request.
fn hand_on(batch: Vec<Job>, values: Vec<i64>, queues: &Arc<ThreadQueues>) {
    if values.len() != REPLY_LEN * batch.len() {
        return answer(batch, Ok(values));
    }
    for (job, one) in batch.into_iter().zip(values.chunks_exact(REPLY_LEN)) {
        let one: [i64; REPLY_LEN] = one.try_into().unwrap_or_default();
        let Job { specs, reply, .. } = job;
        let mut walker = match reply {
            Reply::Walk(walker) => walker,
            reply => {
                reply.send(Ok(one));
                continue;
            }
        };
        walker.walk.merge(&one);
        queues.nodes.place(&mut walker.walk);
        let Some((charges, Some(owner))) = walker.walk.next_run(&specs) else {
            walker.back();
            continue;
        };
        let reply = Reply::Walk(walker);
        if let Err(TrySendError::Full(job) | TrySendError::Closed(job)) = queues.to_master(
            Job {
                specs,
                charges,
                reply,
            },
            owner,
        ) {
            // Back to the request, which tries once more or fails.
            if let Reply::Walk(walker) = job.reply {
                walker.back();
            }
        }
    }
}

/// `cause`, with what to do when it says the server is not part of a cluster.
fn not_a_cluster(cause: &str) -> String {
    if cause.contains("cluster support disabled") {
        format!("{cause} (a server that is not part of a Redis Cluster: `mode: cluster` needs one; one server is `mode: standalone`)")
    } else if cause.contains("unknown command") && cause.contains("CLUSTER") {
        format!("{cause} (a sentinel? `mode: cluster` needs the cluster's nodes; sentinels go in `nodes` with `mode: sentinel`)")
    } else {
        cause.to_owned()
    }
}

/// Why a master's certificate may not name the address it was reached by, where `cause`
/// says so.
fn certificate_name_hint(cause: &str) -> &'static str {
    if cause.contains("not valid for name") {
        " (the cluster names its nodes by the address each announces, its IP address unless \
         cluster-announce-hostname and cluster-preferred-endpoint-type hostname say otherwise: \
         the nodes' certificates must name it)"
    } else {
        ""
    }
}
/// The first master of `map` (in its order) that cannot be reached within `wait` at the
/// address the cluster gives it (all tried at once), and why, with what to change where the
/// certificate does not name that address.
async fn first_unreachable(
    map: &SlotOwners,
    settings: &RedisSettings,
    scheme: &str,
    wait: Duration,
) -> Option<String> {
    let mut tried = tokio::task::JoinSet::new();
    for (at, (host, port)) in map.masters.iter().flatten().enumerate() {
        let url = settings::node_url(scheme, host, *port);
        let (settings, named) = (settings.clone(), format!("{host}:{port}"));
        tried.spawn(async move {
            let reached = match settings.client_at(&url, true) {
                Ok(client) => answer_in_time(wait, RedisSettings::connect_for(&client, wait))
                    .await
                    .map(drop),
                Err(error) => Err(error.to_string()),
            };
            (at, named, reached)
        });
    }
    let mut tried = tried.join_all().await;
    tried.sort_by_key(|(at, ..)| *at);
    let (named, cause) = tried
        .into_iter()
        .find_map(|(_, named, reached)| Some((named, reached.err()?)))?;
    let hint = certificate_name_hint(&cause);
    Some(format!(
        "master {named} it names: {}{hint}",
        bounded(&cause)
    ))
}

/// At most 200 characters of what a server said, for a log line.
fn bounded(said: &str) -> &str {
    match said.char_indices().nth(200) {
        Some((end, _)) => &said[..end],
        None => said,
    }
}

/// Whether a script call failed without Redis running it, so that it can be sent again
/// without charging anyone twice: the cluster is down or its slots are moving, the node is
/// no longer a master or is loading its data, or there was no connection to send it on.
fn refused_before_running(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    error.is_connection_refusal()
        || matches!(
            error.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::BusyLoading
                )
        )
}

/// Whether `error` is a refusal of a script call that declares no key, before it runs, as
/// proxies that route calls by their keys answer: ElastiCache Serverless (`ERR Lua scripts
/// without any input keys are not supported`) and proxies that word it as a count (`ERR
/// ... number of keys can't be negative or zero`).
fn refuses_calls_without_keys(error: &redis::RedisError) -> bool {
    error.code() == Some("ERR") && {
        let text = error.to_string().to_lowercase();
        text.contains("without any input keys") || text.contains("number of keys can't be")
    }
}

/// Whether a server error to a call of the script for no request may pass, the call's shape
/// being fine: the server busy, loading, full, short of replicas, failing over, or refusing
/// this user something (which the probe reports), or the keys' slot moving.
fn passing_refusal(error: &redis::RedisError) -> bool {
    refused_before_running(error)
        || matches!(
            error.code(),
            Some(
                "NOPERM"
                    | "NOAUTH"
                    | "WRONGPASS"
                    | "OOM"
                    | "BUSY"
                    | "MISCONF"
                    | "NOREPLICAS"
                    | "NOSCRIPT"
            )
        )
}

/// One call per hash tag: the jobs with the same tag (the same group and key) together.
fn by_tags(batch: Vec<Job>, queues: &ThreadQueues) {
    // A request that stopped waiting (timed out, answered as `on_error` says) while its job
    // was in a call that gave way is not charged now.
    let (mut batch, several): (Vec<Job>, Vec<Job>) = batch
        .into_iter()
        .filter(|job| !job.reply.is_closed())
        .partition(|job| job.charges.as_slice().len() == 1);
    for job in several {
        match job.reply {
            Reply::Walk(mut walker) => {
                walker.walk.one_by_one();
                walker.back();
            }
            // Every cluster job is a walk's run; a job of several groups that is not could
            // not be decided here.
            reply => reply.send(Err("groups no longer on one master".to_owned())),
        }
    }
    while !batch.is_empty() {
        let tag = batch[0].charges.as_slice().first().copied();
        let (same, rest): (Vec<Job>, Vec<Job>) = batch
            .into_iter()
            .partition(|job| job.charges.as_slice().first().copied() == tag);
        batch = rest;
        tokio::spawn(call_by_tag(
            same,
            queues.connection.clone(),
            queues.nodes.clone(),
            queues.script.clone(),
        ));
    }
}

/// One hash tag's jobs as one script call with declared keys, sent to the master the slot
/// map (or the last one read) names over a connection of the gateway's own (given a
/// quarter of the time to connect), or without a map, or where connecting to that master
/// failed, through the cluster client, which routes it by the tag's slot but sends nothing
/// again itself. The call gives up a little before the first of its requests stops
/// waiting ([`GIVES_UP_EARLY`]). A call Redis refused without running it is sent again
/// here until then: after `ASK` or `MOVED`, to the node named (with `ASKING` before it after
/// `ASK`), over a connection of the gateway's own, kept for the next call there (the node
/// may be one the client has no connection to: a new master taking slots); after
/// `TRYAGAIN`, `CLUSTERDOWN`, no connection and the like, after a pause, to the master the
/// map names again. Any other failure (a connection dropped after the call was written,
/// which the client would have sent again) may come after the script ran: it is the jobs'
/// answer, and `on_error` decides.
async fn call_by_tag(
    batch: Vec<Job>,
    mut connection: redis::cluster_async::ClusterConnection,
    nodes: Arc<NodeCalls>,
    script: Arc<redis::Script>,
) {
    let Some(slot) = batch.first().map(|job| {
        let (group, hash) = job.charges.as_slice()[0];
        job.specs.slot(group, hash)
    }) else {
        return;
    };
    let store_timeout = nodes.direct.settings.timeout;
    let now = tokio::time::Instant::now();
    let until = match batch.iter().filter_map(|job| job.reply.deadline()).min() {
        Some(deadline) => deadline.checked_sub(GIVES_UP_EARLY).unwrap_or(deadline),
        None => now + store_timeout,
    };
    let timeout = until.saturating_duration_since(now);
    let args = CallArgs::new(&batch);
    let command = args.declared(script.get_hash());
    let decided = tokio::time::timeout_at(until, async {
        // Where the call goes, and the connection there once made: first the master the
        // slot map names (the last read, if it was let go), then the node a redirection
        // named, over the gateway's own connections; without a map, or while that master
        // cannot be reached, through the cluster client.
        let to_the_map = |nodes: &NodeCalls| {
            let url = nodes.master_url(slot)?;
            Some(Redirected {
                url,
                asking: false,
                node: None,
            })
        };
        let mut sent_to = to_the_map(&nodes);
        let mut redirections = 0;
        let mut pause = Duration::from_millis(10);
        loop {
            // A node that did not answer an earlier call in time gets nothing more until
            // that call has run ([`LateNodes`]).
            let goes_to = match &sent_to {
                Some(to) => Some(to.url.clone()),
                None => nodes.master_url(slot),
            };
            if let Some(url) = goes_to {
                let ping_wait = settings::connect_timeout(store_timeout);
                let cleared = nodes.late.clear(&url, until, ping_wait).await;
                if cleared.is_err() {
                    // Still held back: the map read again meanwhile (a failover).
                    nodes.read_again(&connection, store_timeout);
                }
                // Not sent even where the PING came back: the PING took part of its time,
                // and a call sent late would hold the node back again, and so on, for a
                // node more than half the timeout away.
                if !cleared? {
                    return Err(LATE_CALL.to_owned());
                }
            }
            let reply = match &mut sent_to {
                Some(to) => {
                    if to.node.is_none() {
                        // A quarter of the time to connect (the connect goes on in the
                        // background, for the calls after).
                        let wait = (timeout / 4).max(Duration::from_millis(50));
                        match nodes.redirected_to(&to.url, wait, until).await {
                            Ok(node) => to.node = Some(node),
                            // Not connected yet (a master that hangs, or one far away whose
                            // connection is still being made): the slot map is read again,
                            // and these requests answered as `on_error` says. The cluster
                            // client would send the call to the same master, which may run
                            // it once it resumes.
                            Err(Unreached::StillConnecting) => {
                                nodes.read_again(&connection, store_timeout);
                                return Err(format!("no connection to {} yet", to.url));
                            }
                            // Unreachable (a master gone, not yet replaced): the slot map
                            // is read again, and the cluster client asked after a pause.
                            Err(Unreached::Failed) => {
                                nodes.slots.store(None);
                                sent_to = None;
                                tokio::time::sleep(pause).await;
                                pause = (pause * 2).min(Duration::from_millis(200));
                                continue;
                            }
                        }
                    }
                    let node = to.node.as_mut().ok_or("no connection to the node named")?;
                    let call = nodes.late.sent(&to.url, node.clone());
                    let reply = if to.asking {
                        let mut pipe = redis::pipe();
                        pipe.cmd("ASKING").ignore().add_command(command.clone());
                        let replies = pipe.query_async::<Vec<redis::Value>>(node).await;
                        replies.map(|mut replies| replies.pop().unwrap_or(redis::Value::Nil))
                    } else {
                        command.query_async::<redis::Value>(node).await
                    };
                    // Not answered in time, the call holds the node back (dropped).
                    if !matches!(&reply, Err(error) if error.is_timeout()) {
                        call.answered();
                    }
                    if let Err(error) = &reply {
                        if !matches!(error.kind(), redis::ErrorKind::Server(_)) {
                            // Not the node's answer (a dropped connection, no reply in
                            // time): the next call there connects anew, and the slot map
                            // is read again (the node may have been replaced).
                            nodes.forget_redirected(&to.url);
                            nodes.slots.store(None);
                        }
                    }
                    reply
                }
                None => {
                    if let Some(why) = nodes.unreachable() {
                        return Err(why);
                    }
                    let reply = command.query_async::<redis::Value>(&mut connection).await;
                    if let Err(error) = &reply {
                        nodes.sent_through_client(error);
                    }
                    reply
                }
            };
            let error = match reply {
                Ok(value) => return numbers(value),
                Err(error) => error,
            };
            if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) {
                let loaded = match &mut sent_to {
                    Some(Redirected {
                        node: Some(node), ..
                    }) => script.load_async(node).await.map(drop),
                    // On the master that serves the call's slot only: the client would
                    // send `SCRIPT LOAD` to every node, and fail the call if any one of
                    // them failed to answer.
                    _ => {
                        let load = redis::cmd("SCRIPT").arg("LOAD").arg(SCRIPT).clone();
                        let route = Route::new(slot, SlotAddr::Master);
                        let master =
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                        connection.route_command(load, master).await.map(drop)
                    }
                };
                loaded.map_err(|e| e.to_string())?;
                continue;
            }
            let asking = error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Ask);
            if let Some((node, _)) = error.redirect_node().filter(|_| redirected(&error)) {
                let (host, port) = node.rsplit_once(':').ok_or_else(|| error.to_string())?;
                let port: u16 = port.parse().map_err(|_| error.to_string())?;
                let host = host.trim_matches(['[', ']']);
                let url = settings::node_url(nodes.direct.scheme, host, port);
                // The slot map is stale: read again (with Redis before 7 nothing else
                // would tell).
                if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Moved) {
                    nodes.slots.store(None);
                }
                // Nodes sending the call back and forth (a slot half moved): a pause
                // between sends after the first two.
                redirections += 1;
                if redirections > 2 {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                sent_to = Some(Redirected {
                    url,
                    asking,
                    node: None,
                });
            } else if refused_before_running(&error) {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
                sent_to = to_the_map(&nodes);
            } else {
                return Err(error.to_string());
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        // A node that did not answer is held back now (`LateNodes`); the map read again.
        nodes.read_again(&connection, store_timeout);
        Err("timed out".to_owned())
    });
    answer(batch, decided);
}

/// How long calls that only the cluster client could send are answered at once after it
/// reached no node for one ([`NodeCalls::unreachable`]), as the other modes answer a
/// connection's requests at once for a while after a failed `PING`.
const UNREACHABLE_PAUSE: Duration = Duration::from_millis(250);

/// How long before the first of its requests stops waiting a call of one hash tag gives up:
/// a timer tick or two, so that a node that has not answered it is held back before any of
/// the requests is answered as `on_error` says, and so before any call sent after them.
const GIVES_UP_EARLY: Duration = Duration::from_millis(2);

/// Clears "a read of the slot map is under way" when dropped.
struct Reading<'a>(&'a AtomicBool, &'a tokio::sync::Notify);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
        self.1.notify_waiters();
    }
}

/// The node a redirection named, by its URL: whether it was `ASK` (the call goes with
/// `ASKING` before it), and the connection to it once made.
struct Redirected {
    url: String,
    asking: bool,
    node: Option<MultiplexedConnection>,
}

impl RedisStore {
    /// Cluster mode: the groups with quotas decided in request order, run after run (a run
    /// being one group, or consecutive groups on one master), until one denies. As in one
    /// call over all groups, a group is charged only if all its quotas admit, and the groups
    /// after a denial are not charged; what differs is that the groups are no longer
    /// decided in one atomic step (another request may be decided between two of them).
    /// The replies are merged into the one the script gives for a whole request, so the
    /// decision is read the same way. The whole request waits at most `timeout`.
    pub(super) fn decide_in_cluster(
        self: &Arc<Self>,
        specs: &Arc<RedisSpecs>,
        charges: Charges,
        cached: Option<(usize, Denial)>,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send>> {
        let store = self.clone();
        let specs = specs.clone();
        let started = self.wait_started();
        Box::pin(async move {
            let Some(cluster) = &store.cluster else {
                return store.fail("not a cluster", cached);
            };
            let queues = match store.cluster_queues(cluster) {
                Ok(queues) => queues,
                Err(why) => return store.fail(&why, cached),
            };
            // One timer for the whole request rather than one per group; longer while
            // this thread's connections to the masters are being made.
            let wait = match queues.connecting(&cluster.nodes, &specs, &charges) {
                true => settings::connect_timeout(store.timeout),
                false => store.timeout,
            };
            let deadline = tokio::time::Instant::now() + wait;
            let decide = store.decide_groups(&queues, &specs, charges, deadline);
            let decision = match tokio::time::timeout_at(deadline, decide).await {
                Ok(Ok(merged)) => store.read_reply(&merged, charges.as_slice(), &specs, cached),
                Ok(Err(why)) => store.fail(&why, cached),
                Err(_) => store.fail("timed out", cached),
            };
            store.waited(started);
            decision
        })
    }

    /// The groups of one request decided run after run (see [`Walk`]), until one denies;
    /// the replies merged into the one the script gives for a whole request. If a run's
    /// master no longer serves all of its keys, its groups are decided one by one.
    async fn decide_groups(
        &self,
        queues: &Arc<ThreadQueues>,
        specs: &Arc<RedisSpecs>,
        charges: Charges,
        deadline: tokio::time::Instant,
    ) -> Result<[i64; REPLY_LEN], String> {
        let mut walk = Walk::new(charges, |group, hash| specs.slot(group, hash));
        loop {
            queues.nodes.place(&mut walk);
            let Some((run, owner)) = walk.next_run(specs) else {
                break;
            };
            let (request, answer) = oneshot::channel();
            let job = Job {
                specs: specs.clone(),
                charges: run,
                reply: Reply::Walk(Walker::new(walk, request, deadline)),
            };
            queues.enqueue(job, owner)?;
            walk = match answer.await {
                Ok(walked) => walked?,
                Err(_) => return Err("the Redis worker stopped".to_owned()),
            };
        }
        Ok(walk.merged())
    }

    /// Cluster mode: this thread's queues, and its own cluster connection, which keeps
    /// itself connected to every master (reconnecting, and refreshing the slot map on
    /// MOVED or when a node is lost).
    fn cluster_queues(&self, cluster: &Cluster) -> Result<Arc<ThreadQueues>, String> {
        // As `RedisStore::queue`: a thread being torn down has none to give.
        CLUSTER_QUEUES
            .try_with(|queues| {
                let mut queues = queues.borrow_mut();
                if let Some(found) = queues
                    .iter()
                    .find(|(id, ..)| *id == self.id)
                    .and_then(|(_, weak, _)| weak.upgrade())
                    .filter(|found| !found.unplaced.is_closed())
                {
                    return found;
                }
                let (unplaced, receiver) = mpsc::channel(QUEUE_LIMIT);
                let made = Arc::new(ThreadQueues {
                    unplaced,
                    masters: Mutex::new(Vec::new()),
                    connected: AtomicUsize::new(0),
                    made: tokio::time::Instant::now(),
                    connection: cluster.connection(),
                    nodes: cluster.nodes.clone(),
                    script: self.script.clone(),
                    timeout: self.timeout,
                });
                tokio::spawn(run_unplaced(receiver, Arc::downgrade(&made)));
                queues.retain(|(id, weak, _)| *id != self.id && weak.strong_count() > 0);
                let release = held::hold(&cluster.held_queues, made.clone());
                queues.push((self.id, Arc::downgrade(&made), release));
                made
            })
            .map_err(|_| "the thread is exiting".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::{probe_key, reaches_a_new_master, MasterQueue, SlotOwners};
    use redis::Value;
    use std::time::Duration;

    /// Only the request's own masters count: one this thread never reached, which the
    /// request's keys are not on, does not make it wait as if connecting.
    #[tokio::test(start_paused = true)]
    async fn a_request_waits_as_if_connecting_only_for_its_own_new_masters() {
        let window = Duration::from_millis(250);
        let task = || -> Option<MasterQueue> {
            Some((tokio::sync::mpsc::channel(1).0, tokio::time::Instant::now()))
        };
        // Masters 0 and 1 have tasks, started now; master 2 has none.
        let masters = [task(), task(), None];
        assert!(
            reaches_a_new_master([0, 1], &masters, window),
            "started just now"
        );
        tokio::time::advance(Duration::from_millis(300)).await;
        assert!(!reaches_a_new_master([0, 1, 0], &masters, window));
        assert!(
            !reaches_a_new_master([1, u16::MAX], &masters, window),
            "no master"
        );
        assert!(
            reaches_a_new_master([0, 2], &masters, window),
            "no task on 2 yet"
        );
        assert!(
            reaches_a_new_master([7], &masters, window),
            "beyond the tasks made"
        );
        assert!(!reaches_a_new_master([], &masters, window));
    }

    #[test]
    fn a_slot_map_naming_no_master_is_no_map() {
        assert!(SlotOwners::parse(&Value::Array(Vec::new())).is_none());
        let range = |start, end, port| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(end),
                Value::Array(vec![
                    Value::BulkString(b"10.0.0.1".to_vec()),
                    Value::Int(port),
                ]),
            ])
        };
        let map = SlotOwners::parse(&Value::Array(vec![
            range(0, 8191, 7000),
            range(8192, 16383, 7001),
        ]))
        .expect("two masters");
        assert_eq!(map.masters.len(), 2);
        assert_eq!(map.master(8192), Some(&("10.0.0.1".to_owned(), 7001)));
    }

    #[test]
    fn the_probe_key_falls_in_the_slot_asked_for() {
        for slot in [0, 1, 5460, 5461, 10922, 10923, 16383] {
            let key = probe_key("reset-gateway", slot);
            let tag = key.trim_start_matches('{').trim_end_matches('}');
            assert!(tag.starts_with("reset-gateway:probe:"), "{key}");
            let crc = crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes());
            assert_eq!(crc % 16384, slot, "{key}");
        }
    }
}
