//! Sentinel mode: asking the sentinels which server is the master, checking with that
//! server (`ROLE`) that it is one, and moving every connection to it after a failover.
//!
//! A sentinel can name a stale master while a failover is under way (it has not yet
//! heard of the promotion), so a named server is used only once it says `master` itself;
//! otherwise the next sentinel is asked. The sentinel whose answer was used is asked
//! first next time, so a dead sentinel costs its timeout once, not on every question.
//! The sentinels are asked without the username and password, and with them when a
//! sentinel wants them; a sentinel's own `requirepass` is the password of its `default`
//! user, so with a username set the password alone is tried too. Whichever way worked is
//! tried first.

use std::sync::atomic::AtomicUsize;

use redis::aio::MultiplexedConnection;

use super::*;

/// The server decisions go to: the standalone one, or the master the sentinels named.
pub(super) struct Master {
    /// Counts masters: a per-thread queue made for an older one is remade.
    pub(super) generation: u64,
    /// The address the sentinels named (standalone: none).
    pub(super) address: Option<(String, u16)>,
    /// Where per-thread connections are made from.
    pub(super) client: redis::Client,
    /// The probe's connection.
    pub(super) connection: ConnectionManager,
}

impl Master {
    pub(super) fn new(
        generation: u64,
        address: Option<(String, u16)>,
        client: redis::Client,
        config: &ConnectionManagerConfig,
    ) -> redis::RedisResult<Self> {
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Master {
            generation,
            address,
            client,
            connection,
        })
    }
}

/// The sentinels, and what asking them has taught.
pub(super) struct SentinelPool {
    sentinels: Sentinels,
    /// The position of the sentinel asked first: the last one whose answer was used.
    first: AtomicUsize,
    /// How the sentinels are asked: the position in [`SENTINEL_AUTH`] of the way that
    /// worked last.
    auth: AtomicUsize,
    /// Whether the sentinels other than the one that named the master have been asked
    /// since it was named ([`RedisStore::check_other_sentinels`]).
    others_checked: AtomicBool,
    /// Per sentinel, the connection kept from its last answer, with the way it was asked
    /// ([`OWN_CREDENTIALS`] or a position in [`SENTINEL_AUTH`]): the sentinels are asked
    /// every second, and a connection (a TLS handshake) each time would cost every sentinel
    /// one per second per gateway, and leave as many sockets waiting to close.
    kept: Vec<std::sync::Mutex<Option<(usize, MultiplexedConnection)>>>,
    /// Why the sentinels' answers could not be used, as logged.
    failure: std::sync::Mutex<CauseLog>,
}

impl SentinelPool {
    pub(super) fn new(sentinels: Sentinels) -> Self {
        let kept = sentinels.nodes.iter().map(|_| Default::default()).collect();
        SentinelPool {
            sentinels,
            first: AtomicUsize::new(0),
            auth: AtomicUsize::new(0),
            others_checked: AtomicBool::new(false),
            kept,
            failure: std::sync::Mutex::new(CauseLog::default()),
        }
    }

    /// Each sentinel's URL.
    pub(super) fn nodes(&self) -> &[String] {
        &self.sentinels.nodes
    }
}

/// The ways a sentinel is asked, as (send the username, send the password): without
/// credentials, with the username and password the master is reached with, and with the
/// password alone (as Redis's `default` user: a sentinel's `requirepass`).
const SENTINEL_AUTH: [(bool, bool); 3] = [(false, false), (true, true), (false, true)];

/// The way a sentinel is asked with its own credentials ([`RedisSettings::sentinel_auth`]),
/// beside the positions in [`SENTINEL_AUTH`].
const OWN_CREDENTIALS: usize = usize::MAX;

/// Whether a sentinel refused because of the credentials: it wants a password it was not
/// given (`NOAUTH`), or it has none and refused the one it was given.
fn refused_credentials(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::AuthenticationFailed || error.code() == Some("NOAUTH")
}

/// Whether a `ROLE` reply says `master` (a replica says `slave`, a sentinel `sentinel`).
fn says_master(role: &redis::Value) -> bool {
    let redis::Value::Array(fields) = role else {
        return false;
    };
    match fields.first() {
        Some(redis::Value::BulkString(role)) => role == b"master",
        Some(redis::Value::SimpleString(role)) => role == "master",
        _ => false,
    }
}

impl RedisStore {
    /// In Sentinel mode: asks the sentinels which server is the master now and, when it
    /// changed (a failover), moves every connection to it. One question at a time. The
    /// error says why no sentinel's answer could be used (the probe logs it).
    pub(super) async fn resolve(&self) -> Result<(), String> {
        let Some(pool) = &self.sentinels else {
            return Ok(());
        };
        let _one = self.resolving.lock().await;
        let current = self.master.load_full();
        self.ask_sentinels(pool, current).await
    }

    /// In Sentinel mode, until the sentinels have named a master: asks them, unless the
    /// question before this one (whose answer this one waited for) named one. The first
    /// requests after start all wait for that one answer, not each for one of its own.
    pub(super) async fn resolve_first(&self) -> Result<(), String> {
        let Some(pool) = &self.sentinels else {
            return Ok(());
        };
        let _one = self.resolving.lock().await;
        let current = self.master.load_full();
        if current.is_some() {
            return Ok(());
        }
        self.ask_sentinels(pool, current).await
    }

    /// Asks the sentinels which server is the master (`current`: the one requests go to
    /// now), and moves every connection to it if it changed. The caller holds `resolving`.
    async fn ask_sentinels(
        &self,
        pool: &SentinelPool,
        current: Option<Arc<Master>>,
    ) -> Result<(), String> {
        self.sentinels_first_asked.get_or_init(|| self.clock.now());
        let found = self.find_master(pool, current.as_deref()).await;
        // Logged once per new reason: the sentinels are asked every second, and more
        // often while requests fail.
        let mut last = pool.failure.lock().unwrap_or_else(|e| e.into_inner());
        let ((host, port), client) = match found {
            Ok(found) => {
                if last.clear() {
                    tracing::info!(target: "reset_guard::limit", "the sentinels name a Redis master again");
                }
                found
            }
            Err(cause) => {
                if last.is_new(&cause, self.clock.now()) {
                    tracing::warn!(target: "reset_guard::limit", error = %cause, "the sentinels named no Redis master that answers as one");
                }
                return Err(cause);
            }
        };
        drop(last);
        if current
            .as_ref()
            .is_some_and(|m| m.address.as_ref() == Some(&(host.clone(), port)))
        {
            return Ok(());
        }
        let generation = current.map_or(1, |m| m.generation + 1);
        let named = format!("{host}:{port}");
        // The other sentinels are asked once more, by the probe, now that one named a
        // master (at start, and after a failover).
        pool.others_checked.store(false, Ordering::Relaxed);
        match Master::new(generation, Some((host, port)), client, &self.config) {
            Ok(master) => {
                tracing::info!(target: "reset_guard::limit", master = %named, "Redis master named by the sentinels");
                self.master.store(Some(Arc::new(master)));
            }
            Err(error) => {
                tracing::warn!(target: "reset_guard::limit", master = %named, %error, "cannot use the Redis master the sentinels named");
            }
        }
        Ok(())
    }

    /// The master's address and a client for it: from the first sentinel, starting with
    /// the one whose answer was used last, that names a server which says it is a master.
    /// Otherwise, each sentinel's reason (logged at debug level as it comes).
    async fn find_master(
        &self,
        pool: &SentinelPool,
        current: Option<&Master>,
    ) -> Result<((String, u16), redis::Client), String> {
        let wait = settings::connect_timeout(self.timeout);
        let count = pool.nodes().len();
        let first = pool.first.load(Ordering::Relaxed);
        // Servers that did not answer as master this time: another sentinel naming one
        // too is passed over without asking it again.
        let mut refused: Vec<(String, u16)> = Vec::new();
        // Why each sentinel's answer was not used, for the warning if none is.
        let mut causes: Vec<String> = Vec::new();
        for at in (0..count).map(|i| (first + i) % count) {
            // Named by its place and its URL (which holds no password: refused when the
            // settings are read), so that a typo in one is found.
            let sentinel = format!("{} ({})", at + 1, pool.nodes()[at]);
            let address = match tokio::time::timeout(wait, self.ask_sentinel(pool, at)).await {
                Ok(Ok(Some(address))) => address,
                Ok(Ok(None)) => {
                    tracing::debug!(target: "reset_guard::limit", master = %pool.sentinels.master, "a sentinel does not know this master");
                    causes.push(format!(
                        "sentinel {sentinel} knows no master named {:?}",
                        pool.sentinels.master
                    ));
                    continue;
                }
                Ok(Err(error)) => {
                    tracing::debug!(target: "reset_guard::limit", %error, "a sentinel did not answer");
                    causes.push(format!(
                        "sentinel {sentinel}: {error}{}",
                        sentinel_hint(&error, self.settings.sentinel_auth.is_some())
                    ));
                    continue;
                }
                Err(_) => {
                    tracing::debug!(target: "reset_guard::limit", "a sentinel did not answer in time");
                    causes.push(format!("sentinel {sentinel}: no answer within {wait:?}"));
                    continue;
                }
            };
            if !host_name_like(&address.0) {
                // Only a host name or an address is a master to connect to; anything else
                // (a reply of megabytes, a control character) would only go into the logs.
                tracing::debug!(target: "reset_guard::limit", "a sentinel named a master by something that is no host name");
                causes.push(format!(
                    "sentinel {sentinel} names a master by no host name"
                ));
                continue;
            }
            let named = format!("{}:{}", address.0, address.1);
            if refused.contains(&address) {
                causes.push(format!("sentinel {sentinel} names {named} too"));
                continue;
            }
            match tokio::time::timeout(wait, self.confirm_master(pool, &address, current)).await {
                Ok(Ok(Some(client))) => {
                    pool.first.store(at, Ordering::Relaxed);
                    return Ok((address, client));
                }
                Ok(Ok(None)) => {
                    tracing::debug!(target: "reset_guard::limit", master = %named, "a sentinel named a Redis server that is not a master");
                    causes.push(format!("sentinel {sentinel} names {named}, not a master"));
                }
                Ok(Err(error)) => {
                    tracing::debug!(target: "reset_guard::limit", master = %named, %error, "cannot reach the Redis master a sentinel named");
                    causes.push(format!("sentinel {sentinel} names {named}: {error}"));
                }
                Err(_) => {
                    tracing::debug!(target: "reset_guard::limit", master = %named, "the Redis master a sentinel named did not answer in time");
                    causes.push(format!(
                        "sentinel {sentinel} names {named}: no answer within {wait:?}"
                    ));
                }
            }
            refused.push(address);
        }
        Err(causes.join("; "))
    }

    /// Once a sentinel has named the master: asks every other sentinel once (off the request
    /// path: the probe calls this), and logs at `warn` those that cannot be asked or do not
    /// know the master. The sentinels are asked in turn, starting with the one that
    /// answered last, so one listed wrong (a typo, a data node, a wrong password of its
    /// own) would otherwise go unnoticed until the ones before it fail.
    pub(super) async fn check_other_sentinels(&self) {
        let Some(pool) = &self.sentinels else {
            return;
        };
        if self.master.load().is_none() || pool.others_checked.swap(true, Ordering::Relaxed) {
            return;
        }
        let answered = pool.first.load(Ordering::Relaxed);
        let wait = settings::connect_timeout(self.timeout);
        let mut causes = Vec::new();
        for at in (0..pool.nodes().len()).filter(|&at| at != answered) {
            let sentinel = format!("{} ({})", at + 1, pool.nodes()[at]);
            match tokio::time::timeout(wait, self.ask_sentinel(pool, at)).await {
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => causes.push(format!(
                    "sentinel {sentinel} knows no master named {:?}",
                    pool.sentinels.master
                )),
                Ok(Err(error)) => causes.push(format!(
                    "sentinel {sentinel}: {error}{}",
                    sentinel_hint(&error, self.settings.sentinel_auth.is_some())
                )),
                Err(_) => causes.push(format!("sentinel {sentinel}: no answer within {wait:?}")),
            }
        }
        if !causes.is_empty() {
            let causes = causes.join("; ");
            tracing::warn!(target: "reset_guard::limit", sentinels = %causes, "sentinels that cannot be asked, while another names the master");
        }
    }

    /// The sentinel at `at`'s answer to `SENTINEL get-master-addr-by-name`: asked the way
    /// that worked last, then the other ways while it refuses the credentials.
    async fn ask_sentinel(
        &self,
        pool: &SentinelPool,
        at: usize,
    ) -> redis::RedisResult<Option<(String, u16)>> {
        let node = &pool.nodes()[at];
        if self.settings.sentinel_auth.is_some() {
            // The sentinels' own credentials, given apart: those only.
            let client = || self.settings.sentinel_client(node);
            return self.query_sentinel(pool, at, OWN_CREDENTIALS, client).await;
        }
        let last = pool.auth.load(Ordering::Relaxed) % SENTINEL_AUTH.len();
        let mut answer = self.query_sentinel_as(pool, at, last).await;
        if self.settings.password.is_none() {
            return answer;
        }
        for way in 0..SENTINEL_AUTH.len() {
            let refused = matches!(&answer, Err(error) if refused_credentials(error));
            // Without a username, the password alone is what the second way sends.
            let same = way == 2 && self.settings.username.is_none();
            if !refused || way == last || same {
                continue;
            }
            answer = self.query_sentinel_as(pool, at, way).await;
            if answer.is_ok() {
                pool.auth.store(way, Ordering::Relaxed);
            }
        }
        answer
    }

    /// [`query_sentinel`](Self::query_sentinel) of the sentinel at `at`, sending the
    /// master's username and password as the way at `way` of [`SENTINEL_AUTH`] says.
    async fn query_sentinel_as(
        &self,
        pool: &SentinelPool,
        at: usize,
        way: usize,
    ) -> redis::RedisResult<Option<(String, u16)>> {
        let (username, password) = SENTINEL_AUTH[way];
        let node = &pool.nodes()[at];
        let client = || self.settings.client_as(node, username, password);
        self.query_sentinel(pool, at, way, client).await
    }

    /// The master's address as the sentinel at `at` names it, if it knows it. The sentinel
    /// whose answer was used last, asked every second, is asked over the connection kept
    /// from its last answer if it was asked the same `way`, else over a new one from
    /// `client`, kept if it answers; a kept one that fails at once (the sentinel restarted,
    /// or closed it) is let go and the question asked again over a new one. The others,
    /// asked only when it fails, each over a new connection: one kept idle for hours can
    /// have died without a word (a NAT's idle timeout), and would spend the whole wait.
    async fn query_sentinel(
        &self,
        pool: &SentinelPool,
        at: usize,
        way: usize,
        client: impl Fn() -> redis::RedisResult<redis::Client>,
    ) -> redis::RedisResult<Option<(String, u16)>> {
        let slot = &pool.kept[at];
        // Taken out while it is used: a question cancelled by the caller's timeout leaves
        // nothing kept.
        let kept = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        let keeping = at == pool.first.load(Ordering::Relaxed);
        if let Some((_, mut connection)) = kept.filter(|(asked, _)| keeping && *asked == way) {
            match self.master_named_over(pool, &mut connection).await {
                Err(error)
                    if error.is_io_error()
                        || error.is_connection_dropped()
                        || error.is_timeout() => {}
                answer => {
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((way, connection));
                    return answer;
                }
            }
        }
        let wait = settings::connect_timeout(self.timeout);
        let mut connection = RedisSettings::connect_for(&client()?, wait).await?;
        let answer = self.master_named_over(pool, &mut connection).await;
        if keeping && answer.is_ok() {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((way, connection));
        }
        answer
    }

    /// `SENTINEL get-master-addr-by-name` over `connection`.
    async fn master_named_over(
        &self,
        pool: &SentinelPool,
        connection: &mut MultiplexedConnection,
    ) -> redis::RedisResult<Option<(String, u16)>> {
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&pool.sentinels.master)
            .query_async(connection)
            .await
    }

    /// A client for the server at `address` when it says `ROLE` master, asked with the
    /// username, password and CA the master is reached with (over the current master's
    /// connection when it is the same server).
    async fn confirm_master(
        &self,
        pool: &SentinelPool,
        address: &(String, u16),
        current: Option<&Master>,
    ) -> redis::RedisResult<Option<redis::Client>> {
        let role = redis::cmd("ROLE");
        let (client, reply) = match current.filter(|m| m.address.as_ref() == Some(address)) {
            Some(master) => {
                let mut connection = master.connection.clone();
                let reply = role.query_async(&mut connection).await?;
                (master.client.clone(), reply)
            }
            None => {
                let url = pool.sentinels.master_url(&address.0, address.1);
                let client = self.settings.client_at(&url, true)?;
                let wait = settings::connect_timeout(self.timeout);
                let mut connection = RedisSettings::connect_for(&client, wait).await?;
                let reply = role.query_async(&mut connection).await?;
                (client, reply)
            }
        };
        Ok(says_master(&reply).then_some(client))
    }
}

#[cfg(test)]
mod tests;

/// What a sentinel's refusal says about the settings: a Redis server given as a sentinel,
/// sentinels that want a password the settings do not hold, or an ACL user of theirs that
/// may not ask for the master.
fn sentinel_hint(error: &redis::RedisError, own_password: bool) -> &'static str {
    let said = error.to_string();
    if said.contains("unknown command") {
        " (not a sentinel: in `mode: sentinel`, `nodes` lists the sentinels; one Redis server is `mode: standalone` with `url`)"
    } else if own_password
        && (said.contains("NOAUTH") || error.kind() == redis::ErrorKind::AuthenticationFailed)
    {
        " (the sentinel refused store.redis.sentinel_password_env or sentinel_password_file (and sentinel_username): not its password, or it has none, and then the keys go)"
    } else if said.contains("NOAUTH") {
        " (the sentinel wants a password: store.redis.sentinel_password_env or sentinel_password_file, its requirepass; without them, the master's password is tried)"
    } else if error.kind() == redis::ErrorKind::AuthenticationFailed {
        " (the sentinel refused the password: where the sentinels' own requirepass differs from the master's password, store.redis.sentinel_password_env or sentinel_password_file)"
    } else if said.contains("NOPERM") || said.contains("no permissions") {
        " (the sentinel's ACL user may not ask for the master: it needs `+sentinel|get-master-addr-by-name`; store.redis.sentinel_username names the user)"
    } else {
        ""
    }
}
