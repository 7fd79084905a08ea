//! Where and how to reach Redis, and what a request gets when it cannot.

use std::fmt;
use std::time::Duration;

use redis::IntoConnectionInfo;
use serde::Deserialize;
use zeroize::Zeroizing;

/// What to do with a request when Redis cannot be asked in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnError {
    /// Let it through unlimited, and count the error.
    #[default]
    Allow,
    /// Answer 503 `Rate limiter unavailable`.
    Deny,
}

impl OnError {
    /// As written in the configuration: `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Allow => "allow",
            OnError::Deny => "deny",
        }
    }
}

/// Why [`RedisSettings`] cannot work, said without repeating a URL (which may hold a
/// secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRedisSettings(String);

/// Where and how to reach Redis.
///
/// One server ([`new`](Self::new)), the master a set of sentinels names
/// ([`sentinel`](Self::sentinel)) or a Redis Cluster ([`cluster`](Self::cluster)); TLS with
/// `rediss://` URLs, a private CA and a client certificate where the servers ask for one;
/// AUTH with a password (and an ACL user) from wherever the program keeps its secrets:
///
/// ```no_run
/// use std::time::Duration;
///
/// use reset_guard::{OnError, RedisSettings};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // A Redis Cluster over TLS, its CA and password read from files (trimmed: a newline
/// // is no part of a password).
/// let password = std::fs::read_to_string("/run/secrets/redis_password")?;
/// let cluster = RedisSettings::cluster(&["rediss://redis-1.internal:6380", "rediss://redis-2.internal:6380"])?
///     .with_username("reset-gateway")
///     .with_password(password.trim())
///     .with_ca_pem(std::fs::read("/etc/ssl/redis-ca.pem")?)
///     .with_timeout(Duration::from_millis(50))
///     .with_on_error(OnError::Deny);
/// cluster.check()?;
///
/// // Through Sentinel: the sentinels and the master's name; the sentinels' own
/// // password, where they have one of their own.
/// let sentinel = RedisSettings::sentinel(&["redis://sentinel-1:26379", "redis://sentinel-2:26379"], "mymaster")?
///     .with_password(std::env::var("REDIS_PASSWORD")?)
///     .with_sentinel_auth(None, std::env::var("SENTINEL_PASSWORD")?);
/// sentinel.check()?;
/// # Ok(())
/// # }
/// ```
///
/// The store's log lines (target `reset_guard::limit`) say why Redis cannot be asked, and
/// hint at the setting to change by its name in the gateway's configuration:
/// `store.redis.password_env` / `password_file` is [`with_password`](Self::with_password)
/// (and `username`, [`with_username`](Self::with_username)), `ca_file` is
/// [`with_ca_pem`](Self::with_ca_pem), `cert_file` and `key_file` are
/// [`with_client_certificate`](Self::with_client_certificate), `sentinel_password_*` and
/// `sentinel_username` are [`with_sentinel_auth`](Self::with_sentinel_auth), `mode` and
/// `nodes` are the constructor, `key_prefix` is [`with_key_prefix`](Self::with_key_prefix).
/// The Redis client logs under the target `redis`: it retries connections on its own, and
/// says so at every try, so filter it (`redis=off`) as the gateway does.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisSettings {
    /// `redis://host:port[/db]`, or `rediss://` for TLS; a password goes in
    /// [`password`](Self::password), never in the URL. Through Sentinel (see
    /// [`sentinel`](Self::sentinel)): `redis+sentinel://host:port,host:port/master`, or
    /// `rediss+sentinel://` when the sentinels and the master speak TLS.
    pub url: String,
    /// The ACL user (Redis 6+); none: the default user.
    pub username: Option<String>,
    /// The password sent with `AUTH`.
    pub password: Option<Zeroizing<String>>,
    /// Sentinel mode: the sentinels' own credentials (their `requirepass`, or an ACL user
    /// of theirs), where they differ from the master's: the username (none: the default
    /// user) and the password. When set, the sentinels are asked with these only; when
    /// not, without credentials and then with the master's.
    pub sentinel_auth: Option<(Option<String>, Zeroizing<String>)>,
    /// PEM certificates of a private CA that Redis's TLS certificate chains to; then only
    /// these are trusted for Redis (none: the public web PKI roots).
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate for `rediss://` servers that ask for one (Redis's own TLS
    /// default, `tls-auth-clients yes`): its PEM certificate chain and PEM private key.
    pub client_certificate: Option<(Vec<u8>, Zeroizing<Vec<u8>>)>,
    /// Prepended to every key, so several deployments can share one server.
    pub key_prefix: String,
    /// Longest a request waits for Redis: 1ms to 60s. Requests that wait for a connection
    /// to be made get four times it, at least 250 ms ([`Self::longest_wait`]).
    pub timeout: Duration,
    /// What happens when Redis cannot answer in time.
    pub on_error: OnError,
    /// Cluster mode: how many keys the `global` group is spread over (1 to
    /// [`MAX_GLOBAL_KEYS`]; 1, the default, is one exact key). With N, each global quota
    /// is N quotas of 1/N of its rate and burst, one per key, and a request charges the
    /// key of its address's part of the slot range: the one hot key's load is spread over
    /// the masters, and the global charge is usually decided in the same call as the
    /// address's (see the README's "Several replicas"). An approximation: a key whose
    /// part of the traffic comes faster than its share is refused while the others still
    /// have room, so the whole is never more than the quota, but can refuse a little
    /// before it. Each global quota needs a burst of at least N: the builder refuses less,
    /// and a reload through [`GuardHandle::update`](crate::GuardHandle::update) with less
    /// spreads the group over as many keys as the smallest burst (its state starting
    /// afresh), with a warning.
    pub global_keys: u16,
}

/// Most keys [`RedisSettings::global_keys`] spreads the `global` group over.
pub const MAX_GLOBAL_KEYS: u16 = 1024;

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &without_credentials(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "(set)"))
            .field(
                "sentinel_auth",
                &self.sentinel_auth.as_ref().map(|(user, _)| (user, "(set)")),
            )
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "(set)"))
            .field(
                "client_certificate",
                &self.client_certificate.as_ref().map(|_| "(set)"),
            )
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .field("global_keys", &self.global_keys)
            .finish()
    }
}

/// `url` for logs and `Debug`: a user and password (before the last `@`) and any query or
/// fragment (`?password=`) left out. A `@` elsewhere can cut more than the credentials,
/// never less.
fn without_credentials(url: &str) -> String {
    let (base, tail) = match url.find(['?', '#']) {
        Some(cut) => (&url[..cut], "?(left out)"),
        None => (url, ""),
    };
    let host_from = base.find("://").map_or(0, |scheme| scheme + 3);
    match base[host_from..].rfind('@') {
        Some(at) => format!(
            "{}(credentials)@{}{tail}",
            &base[..host_from],
            &base[host_from + at + 1..]
        ),
        None => format!("{base}{tail}"),
    }
}

/// Longest [`RedisSettings::timeout`]: a request waits that long for Redis.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

impl RedisSettings {
    /// Whether these settings can work, as [`crate::ResetGuardBuilder::build`] checks
    /// them: a URL the client accepts, with no user, password, query or fragment in it
    /// (they go in [`username`](Self::username) and [`password`](Self::password)), and a
    /// timeout from 1ms to 60s.
    /// The error says what is wrong without repeating the URL.
    pub fn check(&self) -> Result<(), InvalidRedisSettings> {
        Self::check_url(&self.url).map_err(|why| InvalidRedisSettings(format!("url {why}")))?;
        if self.timeout < Duration::from_millis(1) || self.timeout > MAX_TIMEOUT {
            return Err(InvalidRedisSettings(
                "timeout must be 1ms to 60s".to_owned(),
            ));
        }
        if self.global_keys == 0 || self.global_keys > MAX_GLOBAL_KEYS {
            return Err(InvalidRedisSettings(format!(
                "global_keys must be 1 to {MAX_GLOBAL_KEYS}"
            )));
        }
        if self.global_keys > 1 && self.cluster_nodes().is_none() {
            return Err(InvalidRedisSettings(
                "global_keys above 1 is for a Redis Cluster (one server holds the one global key at no extra cost)".to_owned(),
            ));
        }
        if self.username.is_some() && self.password.is_none() {
            return Err(InvalidRedisSettings(
                "a username needs a password (AUTH sends both; without one, every connection would run as Redis's default user)".to_owned(),
            ));
        }
        let passwords = self.password.iter().map(|p| ("password", p)).chain(
            self.sentinel_auth
                .iter()
                .map(|(_, p)| ("the sentinels' password", p)),
        );
        for (which, password) in passwords {
            if password.is_empty() {
                return Err(InvalidRedisSettings(format!("{which} is empty")));
            }
            // A line break inside may be the password's own (Redis takes any bytes); one at
            // either end is a file's, left untrimmed.
            if password.starts_with(['\n', '\r']) || password.ends_with(['\n', '\r']) {
                return Err(InvalidRedisSettings(format!(
                    "{which} begins or ends with a line break (read from a file? trim it)"
                )));
            }
        }
        // (The sentinel and cluster forms are `rediss+sentinel://`, `rediss+cluster://`.)
        if (self.ca_pem.is_some() || self.client_certificate.is_some())
            && !self.url.starts_with("rediss")
        {
            return Err(InvalidRedisSettings(
                "ca_pem and the client certificate are for TLS: the URL (in sentinel and \
                 cluster mode, every node) must start with rediss://"
                    .to_owned(),
            ));
        }
        if let Some(pem) = &self.ca_pem {
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let certificates = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>();
            match certificates {
                Ok(certificates) if !certificates.is_empty() => {}
                Ok(_) => {
                    return Err(InvalidRedisSettings(
                        "ca_pem holds no PEM certificate (give the file's contents, not its path)"
                            .to_owned(),
                    ))
                }
                Err(error) => {
                    return Err(InvalidRedisSettings(format!(
                        "ca_pem cannot be read as PEM certificates: {error}"
                    )))
                }
            }
        }
        if let Some((username, _)) = &self.sentinel_auth {
            if self.sentinels().is_none() {
                return Err(InvalidRedisSettings(
                    "sentinel_auth is for Sentinel mode (the sentinels' own credentials)"
                        .to_owned(),
                ));
            }
            if username.as_deref().is_some_and(str::is_empty) {
                return Err(InvalidRedisSettings(
                    "the sentinels' username must be non-empty (none: their default user)"
                        .to_owned(),
                ));
            }
        }
        Ok(())
    }

    /// The server at `url`, with the key prefix `reset-gateway`, a 50ms timeout and
    /// `on_error: allow`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisSettings {
            url: url.into(),
            username: None,
            password: None,
            sentinel_auth: None,
            ca_pem: None,
            client_certificate: None,
            key_prefix: "reset-gateway".to_owned(),
            timeout: Duration::from_millis(50),
            on_error: OnError::Allow,
            global_keys: 1,
        }
    }

    /// With the ACL user `username` (Redis 6+).
    pub fn with_username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    /// With the password sent with `AUTH` (kept in memory that is wiped when dropped), as
    /// given: one read from a file must be trimmed of its newline ([`check`](Self::check)
    /// refuses a password holding a line break, and an empty one).
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(Zeroizing::new(password.into()));
        self
    }

    /// Sentinel mode: the sentinels asked as `username` (none: their default user) with
    /// `password`, their own credentials (see [`sentinel_auth`](Self::sentinel_auth)).
    pub fn with_sentinel_auth(
        mut self,
        username: Option<String>,
        password: impl Into<String>,
    ) -> Self {
        self.sentinel_auth = Some((username, Zeroizing::new(password.into())));
        self
    }

    /// Trusting only the CA certificates in `pem` (the PEM text, as read from the file, not
    /// its path) for Redis's TLS.
    pub fn with_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Sending the client certificate in `cert_pem` (its chain, PEM), whose private key is
    /// `key_pem`, to `rediss://` servers that ask for one.
    pub fn with_client_certificate(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.client_certificate = Some((cert_pem.into(), Zeroizing::new(key_pem.into())));
        self
    }

    /// With every key prefixed by `prefix`.
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Waiting at most `timeout` for Redis (1ms to 60s; four times it, at least 250 ms,
    /// while a connection is made).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The longest a request may wait for Redis: four times [`timeout`](Self::timeout), at
    /// least 250 ms. Only requests that wait for a connection to be made wait that long (a
    /// thread's first, the first after Redis stopped answering or came back, or after the
    /// master changed, and in Sentinel mode those before the sentinels first name a master,
    /// soon after they are first asked); the others wait `timeout`. A host that bounds a
    /// request's time should allow it more than this (under [`OnError::Allow`], this and
    /// what the request does next), or such a wait ends in the host's timeout rather than
    /// as [`on_error`](Self::on_error) says.
    pub fn longest_wait(&self) -> Duration {
        connect_timeout(self.timeout)
    }

    /// Answering as `on_error` says when Redis cannot answer in time.
    pub fn with_on_error(mut self, on_error: OnError) -> Self {
        self.on_error = on_error;
        self
    }

    /// Cluster mode: the `global` group spread over `keys` keys (see
    /// [`global_keys`](Self::global_keys)).
    pub fn with_global_keys(mut self, keys: u16) -> Self {
        self.global_keys = keys;
        self
    }

    /// Settings for the master the sentinels at `nodes` (`redis://host:port`, or all
    /// `rediss://`) name `master`, otherwise as [`new`](Self::new). The username,
    /// password and CA apply to the master and its replicas; the sentinels are asked with
    /// their own credentials where [`with_sentinel_auth`](Self::with_sentinel_auth) gives
    /// them, else without the username and password, and with them when they want one
    /// (their own `requirepass`, the same); the CA applies to them too.
    ///
    /// # Errors
    ///
    /// What is wrong with which node (counted from 1), without repeating it.
    pub fn sentinel(nodes: &[impl AsRef<str>], master: &str) -> Result<Self, InvalidRedisSettings> {
        let nodes: Vec<String> = nodes.iter().map(|n| n.as_ref().to_owned()).collect();
        if nodes.is_empty() {
            return Err(InvalidRedisSettings(
                "sentinel mode needs at least one sentinel".to_owned(),
            ));
        }
        if master.is_empty() || master.contains([',', '/', ' ']) {
            return Err(InvalidRedisSettings(
                "the master's name must be non-empty, without `,`, `/` or spaces".to_owned(),
            ));
        }
        let (scheme, addresses) =
            node_addresses(&nodes, "a sentinel's own").map_err(InvalidRedisSettings)?;
        Ok(Self::new(format!(
            "{scheme}+sentinel://{}/{master}",
            addresses.join(",")
        )))
    }

    /// Settings for the Redis Cluster that the seed `nodes` (`redis://host:port`, or all
    /// `rediss://`) belong to, otherwise as [`new`](Self::new). The username, password and
    /// CA apply to every node of the cluster.
    ///
    /// # Errors
    ///
    /// What is wrong with which node (counted from 1), without repeating it.
    pub fn cluster(nodes: &[impl AsRef<str>]) -> Result<Self, InvalidRedisSettings> {
        let nodes: Vec<String> = nodes.iter().map(|n| n.as_ref().to_owned()).collect();
        if nodes.is_empty() {
            return Err(InvalidRedisSettings(
                "cluster mode needs at least one seed node".to_owned(),
            ));
        }
        let (scheme, addresses) = node_addresses(&nodes, "every node is asked with the same one")
            .map_err(InvalidRedisSettings)?;
        Ok(Self::new(format!(
            "{scheme}+cluster://{}",
            addresses.join(",")
        )))
    }

    /// Whether the client accepts `url` (checked without connecting) and it carries no
    /// user, password, query or fragment; the error says what is wrong without repeating
    /// the URL, which may hold a secret.
    pub fn check_url(url: &str) -> Result<(), &'static str> {
        if let Some(nodes) = cluster_nodes(url) {
            return nodes.iter().try_for_each(|node| Self::check_url(node));
        }
        if let Some(sentinels) = Sentinels::parse(url) {
            if sentinels.master.is_empty() {
                return Err("names no master: redis+sentinel://host:port,host:port/master");
            }
            return sentinels
                .nodes
                .iter()
                .try_for_each(|node| Self::check_url(node));
        }
        let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
        if !["redis", "rediss", "redis+unix", "unix"].contains(&scheme) {
            return Err(
                "must start with redis:// or rediss:// (for TLS), in lower case, or unix:// \
                 for a socket",
            );
        }
        let info = url.into_connection_info().map_err(|_| {
            "is not a valid Redis URL: redis://host:port[/db], or rediss:// for TLS"
        })?;
        if info.redis_settings().password().is_some() {
            return Err("holds a password, which is given apart from the URL");
        }
        if info.redis_settings().username().is_some() {
            // Where a password is written by mistake, it would travel as the user's name.
            return Err("holds a user name, which is given apart from the URL");
        }
        if has_query(url) {
            return Err(QUERY_REFUSED);
        }
        if info.redis_settings().db() < 0 {
            return Err("names a database below 0 (Redis numbers them from /0)");
        }
        if port_of(info.addr()) == Some(0) {
            return Err("names port 0, which no server listens on");
        }
        Ok(())
    }

    /// The sentinels to ask for the master, in Sentinel mode.
    pub(crate) fn sentinels(&self) -> Option<Sentinels> {
        Sentinels::parse(&self.url)
    }

    /// The seed nodes' URLs, in Cluster mode.
    pub(crate) fn cluster_nodes(&self) -> Option<Vec<String>> {
        cluster_nodes(&self.url)
    }

    /// The cluster client for these settings: the seed nodes, with the username and
    /// password, TLS through rustls with `ca_pem` when set, and `timeout` per reply. With
    /// `retries`, it follows redirections and reconnects and sends a command again on its
    /// own (for the probe's questions, which can be asked twice); without, every failure
    /// comes back to the caller (for script calls, which must not run twice: the client
    /// sends a command again after its connection drops, when Redis may have run it).
    pub(crate) fn cluster_client(
        &self,
        nodes: &[String],
        retries: bool,
    ) -> redis::RedisResult<redis::cluster::ClusterClient> {
        let mut builder =
            redis::cluster::ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                .connection_timeout(connect_timeout(self.timeout))
                .response_timeout(self.timeout)
                // A call can be bounced several times while slots move (MOVED, then ASK,
                // TRYAGAIN while a slot's keys are split between two nodes); with 3 retries
                // one in about 170,000 calls gave up mid-reshard (a 5xx under deny). The
                // store timeout bounds the whole wait, however many retries it holds.
                .retries(if retries { 16 } else { 0 })
                .min_retry_wait(10)
                .max_retry_wait(200)
                .tcp_settings(tcp_settings());
        if let Some(username) = &self.username {
            builder = builder.username(username);
        }
        if let Some(password) = &self.password {
            builder = builder.password(password.as_str());
        }
        if let Some(certificates) = self.tls_certificates() {
            builder = builder.certs(certificates);
        }
        builder.build()
    }

    /// The client for these settings: the URL's address and database, the username and
    /// password given apart from it, TLS through rustls with `ca_pem` when set.
    pub(crate) fn client(&self) -> redis::RedisResult<redis::Client> {
        self.client_at(&self.url, true)
    }

    /// The client for the server at `url`: with the username and password when `auth`
    /// (Sentinel mode asks the sentinels without them first), TLS with `ca_pem` when set.
    pub(crate) fn client_at(&self, url: &str, auth: bool) -> redis::RedisResult<redis::Client> {
        self.client_as(url, auth, auth)
    }

    /// A connection of its own from `client` whose calls may each take `wait` (the Redis
    /// client's default, 500 ms, would fail a slower answer however long `timeout` is).
    pub(crate) async fn connect_for(
        client: &redis::Client,
        wait: std::time::Duration,
    ) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(wait))
            .set_response_timeout(Some(wait));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Whether the server still takes these settings' password (and username), asked over
    /// a connection already made: `AUTH` again, which a server refusing it answers without
    /// changing the connection. The probe's connections were authenticated once; a password
    /// changed on the server since (a rotation half done) refuses every connection the
    /// threads make anew while the probe's own still works, and the gateway would say it is
    /// ready while most requests fail. Nothing is asked without a password.
    pub(crate) async fn still_authenticates(
        &self,
        connection: &mut impl redis::aio::ConnectionLike,
    ) -> Result<(), String> {
        let Some(password) = &self.password else {
            return Ok(());
        };
        let mut auth = redis::cmd("AUTH");
        if let Some(username) = &self.username {
            auth.arg(username);
        }
        auth.arg(password.as_str());
        let mut answer = auth.query_async::<()>(connection).await;
        // A server before Redis 6 (or a proxy) takes the password alone, as the Redis
        // client's own connection setup then sends it.
        if answer
            .as_ref()
            .is_err_and(|e| e.to_string().contains("wrong number of arguments"))
        {
            answer = redis::cmd("AUTH")
                .arg(password.as_str())
                .query_async::<()>(connection)
                .await;
        }
        match answer {
            Err(error)
                if error.kind() == redis::ErrorKind::AuthenticationFailed
                    || error.code() == Some("WRONGPASS") =>
            {
                Err(format!(
                    "AUTH: {error} (the server does not take store.redis.password_env or password_file (and username), and refuses every new connection: not its password (changed on the server but not here?), or the server has none)"
                ))
            }
            Err(error) if error.to_string().contains("without any password configured") => Err(
                "AUTH: the server has no password and refuses one (leave store.redis.password_env and password_file out, or is this the server meant?)".to_owned(),
            ),
            // The connection is made with its first command, this one: what failed in the
            // making (the server away, a database the user may not select) is not AUTH's.
            Err(error)
                if error.is_io_error()
                    || error.is_connection_refusal()
                    || error.is_connection_dropped()
                    || error.is_timeout() =>
            {
                Err(error.to_string())
            }
            Err(error) if error.to_string().contains("refused to switch database") => Err(format!(
                "SELECT: {error} (the URL's database: an ACL user needs +select, or use database 0)"
            )),
            Err(error) => Err(format!("AUTH: {error}")),
            Ok(()) => Ok(()),
        }
    }

    /// [`client_at`](Self::client_at), saying apart whether the username and the password
    /// are sent: a password alone authenticates as Redis's `default` user (a sentinel's own
    /// `requirepass`).
    pub(crate) fn client_as(
        &self,
        url: &str,
        username: bool,
        password: bool,
    ) -> redis::RedisResult<redis::Client> {
        let name = self.username.as_deref().filter(|_| username && password);
        let secret = self.password.as_deref().filter(|_| password);
        self.client_with(url, name, secret.map(String::as_str))
    }

    /// The client for the sentinel at `url`, with the sentinels' own credentials
    /// ([`sentinel_auth`](Self::sentinel_auth), which must be set).
    pub(crate) fn sentinel_client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        let (name, secret) = self
            .sentinel_auth
            .as_ref()
            .map_or((None, None), |(n, s)| (n.as_deref(), Some(s.as_str())));
        self.client_with(url, name, secret)
    }

    /// The client for the server at `url`, authenticating as `username` (with a password)
    /// with `password`; TLS with `ca_pem` when set.
    fn client_with(
        &self,
        url: &str,
        username: Option<&str>,
        password: Option<&str>,
    ) -> redis::RedisResult<redis::Client> {
        let info = url.into_connection_info()?;
        let mut handshake = info.redis_settings().clone();
        if let Some(name) = username.filter(|_| password.is_some()) {
            handshake = handshake.set_username(name);
        }
        if let Some(secret) = password {
            handshake = handshake.set_password(secret);
        }
        let info = info
            .set_redis_settings(handshake)
            .set_tcp_settings(tcp_settings());
        match self.tls_certificates() {
            Some(certificates) => redis::Client::build_with_tls(info, certificates),
            None => redis::Client::open(info),
        }
    }

    /// The private CA and the client certificate, where either is set (else the client's
    /// defaults: the public web PKI roots, no client certificate).
    fn tls_certificates(&self) -> Option<redis::TlsCertificates> {
        if self.ca_pem.is_none() && self.client_certificate.is_none() {
            return None;
        }
        Some(redis::TlsCertificates {
            client_tls: self.client_certificate.as_ref().map(|(cert, key)| {
                redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.to_vec(),
                }
            }),
            root_cert: self.ca_pem.clone(),
        })
    }
}

/// Every Redis connection's TCP settings: `TCP_NODELAY`, so that a call written while an
/// earlier one on the same connection is unanswered (a multiplexed connection pipelines) is
/// sent at once rather than held for its acknowledgement (Nagle's algorithm), as redis-server
/// does for its side.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// The TCP port of `address` (none for a Unix socket).
fn port_of(address: &redis::ConnectionAddr) -> Option<u16> {
    match address {
        redis::ConnectionAddr::Tcp(_, port) | redis::ConnectionAddr::TcpTls { port, .. } => {
            Some(*port)
        }
        _ => None,
    }
}

/// Every node's scheme (`redis` or `rediss`, the same for all) and `host:port`; `password`
/// says why a node may not hold a password.
fn node_addresses(nodes: &[String], password: &str) -> Result<(&'static str, Vec<String>), String> {
    let scheme = scheme_of(nodes);
    let tls = scheme == "rediss";
    let mut addresses = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let n = i + 1;
        if !(node.starts_with("redis://") || node.starts_with("rediss://")) {
            return Err(format!("node {n} {SCHEME_REFUSED}"));
        }
        if node.contains(',') {
            // The nodes travel joined by commas: one inside a node would split it in two.
            return Err(format!(
                "node {n} holds a comma: give each node as an entry of its own"
            ));
        }
        let info = node
            .as_str()
            .into_connection_info()
            .map_err(|_| format!("node {n} is not a valid Redis URL: redis://host:port"))?;
        if info.redis_settings().password().is_some() {
            return Err(format!(
                "node {n} holds a password: {password}, given apart from the URLs"
            ));
        }
        if info.redis_settings().username().is_some() {
            return Err(format!(
                "node {n} holds a user name, which is given apart from the URLs"
            ));
        }
        if has_query(node) {
            return Err(format!("node {n} {QUERY_REFUSED}"));
        }
        if port_of(info.addr()) == Some(0) {
            return Err(format!("node {n} names port 0, which no server listens on"));
        }
        if info.redis_settings().db() != 0 {
            // Cluster has only database 0, and a sentinel's URL says nothing of the master's.
            return Err(format!(
                "node {n} names a database: in sentinel and cluster mode database 0 is used \
                 (keep deployments apart with store.redis.key_prefix)"
            ));
        }
        if node.starts_with("rediss://") != tls {
            return Err(format!(
                "node {n}: every node must use the same scheme, redis:// or rediss://"
            ));
        }
        match info.addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => {
                if host.contains(':') {
                    addresses.push(format!("[{host}]:{port}"));
                } else {
                    addresses.push(format!("{host}:{port}"));
                }
            }
            _ => return Err(format!("node {n}: a node is reached over TCP")),
        }
    }
    Ok((scheme, addresses))
}

/// Why a scheme other than `redis://` or `rediss://` is refused: the client reads the scheme
/// in any case and takes others (`valkeys://` is TLS too), where the gateway tells TLS by
/// these two as written; `REDISS://` would have sent the password in clear.
const SCHEME_REFUSED: &str = "must start with redis:// or rediss:// (for TLS), in lower case";

/// Why a URL with a query or a fragment is refused: the client reads a few settings from
/// there (`#insecure` turns off certificate checks) and ignores the rest, where a password
/// written as `?password=` would sit unnoticed.
const QUERY_REFUSED: &str = "has a query or a fragment (`?`, `#`): no setting is given in \
     the URL, and a password is given apart from it";

/// Whether `url` carries a query or a fragment.
fn has_query(url: &str) -> bool {
    url.contains(['?', '#'])
}

/// The scheme of a list of nodes, all of which use the first one's (`redis` or `rediss`).
pub(crate) fn scheme_of(nodes: &[String]) -> &'static str {
    if nodes
        .first()
        .is_some_and(|node| node.starts_with("rediss://"))
    {
        "rediss"
    } else {
        "redis"
    }
}

/// Cluster mode's seed nodes, read from a `redis+cluster://` or `rediss+cluster://` URL.
fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = [
        ("redis", "redis+cluster://"),
        ("rediss", "rediss+cluster://"),
    ]
    .into_iter()
    .find_map(|(scheme, prefix)| Some((scheme, url.strip_prefix(prefix)?)))?;
    Some(
        rest.split(',')
            .map(|host| format!("{scheme}://{host}"))
            .collect(),
    )
}

/// Sentinel mode, read from a `redis+sentinel://` or `rediss+sentinel://` URL.
#[derive(Debug, Clone)]
pub(crate) struct Sentinels {
    /// Each sentinel's URL.
    pub(crate) nodes: Vec<String>,
    /// The name the sentinels know the master by.
    pub(crate) master: String,
    /// `redis` or `rediss`: how the sentinels and the master are reached.
    pub(crate) scheme: &'static str,
}

impl Sentinels {
    fn parse(url: &str) -> Option<Sentinels> {
        let (scheme, rest) = [
            ("redis", "redis+sentinel://"),
            ("rediss", "rediss+sentinel://"),
        ]
        .into_iter()
        .find_map(|(scheme, prefix)| Some((scheme, url.strip_prefix(prefix)?)))?;
        let (hosts, master) = rest.split_once('/').unwrap_or((rest, ""));
        Some(Sentinels {
            nodes: hosts
                .split(',')
                .map(|host| format!("{scheme}://{host}"))
                .collect(),
            master: master.to_owned(),
            scheme,
        })
    }

    /// The master's URL, once the sentinels have named its address.
    pub(crate) fn master_url(&self, host: &str, port: u16) -> String {
        node_url(self.scheme, host, port)
    }
}

/// The URL of a server a sentinel or a cluster named by address (an IPv6 address in
/// brackets).
pub(crate) fn node_url(scheme: &str, host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("{scheme}://[{host}]:{port}")
    } else {
        format!("{scheme}://{host}:{port}")
    }
}

/// How long making a connection may take, with the call it is made for: several round
/// trips where a call takes one (TCP, TLS, `AUTH`, the client's own hello, in Cluster mode
/// the slot map read through a seed first, the script loaded on a first `NOSCRIPT`).
/// Measured against a Redis 80 ms away, TCP handshakes included, a first standalone
/// decision takes four to five round trips and a first Cluster one six to seven; with
/// `timeout` a few round trips, as the README advises, four times it covers them. At least
/// 250 ms, for Redis close by.
pub(crate) fn connect_timeout(timeout: std::time::Duration) -> std::time::Duration {
    (timeout * CONNECTION_TIMEOUTS).max(std::time::Duration::from_millis(250))
}

/// How many of `timeout` making a connection may take ([`connect_timeout`]).
const CONNECTION_TIMEOUTS: u32 = 4;

#[cfg(test)]
mod tests {
    use super::{without_credentials, RedisSettings};

    #[test]
    fn the_sentinels_own_credentials_are_for_sentinel_mode_only() {
        let nodes = ["redis://10.0.0.1:26379".to_owned()];
        let sentinel = RedisSettings::sentinel(&nodes, "mymaster").unwrap();
        assert!(sentinel
            .clone()
            .with_sentinel_auth(None, "pw")
            .check()
            .is_ok());
        let named = sentinel
            .with_sentinel_auth(Some(String::new()), "pw")
            .check();
        assert!(named.unwrap_err().to_string().contains("non-empty"));
        let standalone = RedisSettings::new("redis://10.0.0.1:6379").with_sentinel_auth(None, "pw");
        let refused = standalone.check().unwrap_err().to_string();
        assert!(refused.contains("Sentinel mode"), "{refused}");
        assert!(
            !format!("{standalone:?}").contains("pw\""),
            "{standalone:?}"
        );
    }

    /// Credentials and a CA that could not work are refused when the store is built, as
    /// the gateway's configuration refuses them, rather than failing every connection (a
    /// username without a password ran as the default user; an empty password, one read
    /// from a file with its newline, or a CA path given as its contents were only seen as
    /// refused passwords and untrusted servers).
    #[test]
    fn credentials_and_a_ca_that_cannot_work_are_refused() {
        let server = || RedisSettings::new("rediss://10.0.0.1:6380");
        let refused = |settings: RedisSettings| settings.check().unwrap_err().to_string();
        assert!(refused(server().with_username("bob")).contains("needs a password"));
        assert!(refused(server().with_password("")).contains("password is empty"));
        let with_newline = refused(server().with_password("s3cret\n"));
        assert!(with_newline.contains("line break"), "{with_newline}");
        assert!(!with_newline.contains("s3cret"), "{with_newline}");
        // One inside may be the password's own (base64 wrapped at 64 characters).
        assert!(server().with_password("abc\ndef").check().is_ok());
        assert!(server()
            .with_username("bob")
            .with_password("s3cret")
            .check()
            .is_ok());
        let path = refused(server().with_ca_pem("/etc/ssl/redis-ca.pem"));
        assert!(path.contains("no PEM certificate"), "{path}");
        // A CA for a URL without TLS: build() refused it in the client's words.
        let plain = RedisSettings::new("redis://10.0.0.1:6379").with_ca_pem("/etc/ssl/ca.pem");
        assert!(refused(plain).contains("are for TLS"));
        let plain = RedisSettings::cluster(&["redis://10.0.0.1:6379"])
            .unwrap()
            .with_ca_pem("/etc/ssl/ca.pem");
        assert!(refused(plain).contains("must start with rediss://"));
        let nodes = ["redis://10.0.0.1:26379".to_owned()];
        let sentinel = RedisSettings::sentinel(&nodes, "mymaster").unwrap();
        let empty = refused(sentinel.with_sentinel_auth(None, ""));
        assert!(empty.contains("sentinels' password is empty"), "{empty}");
    }

    #[test]
    fn only_redis_and_rediss_in_lower_case_are_taken_for_tls_is_told_by_them() {
        // The client reads these (TLS for the `s` ones); the gateway would have sent the
        // password in clear to a `REDISS://` node, taking it for a plain one.
        for node in [
            "REDISS://10.0.0.1:6380",
            "Rediss://10.0.0.1:6380",
            "valkeys://10.0.0.1:6380",
            "valkey://10.0.0.1:6379",
            "REDIS://10.0.0.1:6379",
        ] {
            let nodes = ["redis://10.0.0.2:6379".to_owned(), node.to_owned()];
            for refused in [
                RedisSettings::cluster(&nodes).unwrap_err().to_string(),
                RedisSettings::sentinel(&nodes, "m")
                    .unwrap_err()
                    .to_string(),
            ] {
                assert!(
                    refused.contains("node 2 must start with redis:// or rediss://"),
                    "{node}: {refused}"
                );
            }
            let alone = RedisSettings::new(node).check().unwrap_err().to_string();
            assert!(
                alone.contains("url must start with redis://"),
                "{node}: {alone}"
            );
        }
        for url in [
            "rediss://10.0.0.1:6380",
            "rediss://[::1]:6380",
            "unix:///run/redis.sock",
            "unix:/run/redis.sock",
            "redis+unix:///run/redis.sock",
        ] {
            assert!(RedisSettings::new(url).check().is_ok(), "{url}");
        }
    }

    #[test]
    fn a_comma_inside_a_node_is_refused_rather_than_splitting_it() {
        let nodes = ["rediss://localhost,127.0.0.1:6380".to_owned()];
        for refused in [
            RedisSettings::cluster(&nodes).unwrap_err().to_string(),
            RedisSettings::sentinel(&nodes, "m")
                .unwrap_err()
                .to_string(),
        ] {
            assert!(refused.contains("node 1 holds a comma"), "{refused}");
        }
    }

    #[test]
    fn a_database_below_zero_is_refused() {
        let refused = RedisSettings::check_url("redis://10.0.0.1:6379/-1").unwrap_err();
        assert!(refused.contains("below 0"), "{refused}");
        assert!(RedisSettings::check_url("redis://10.0.0.1:6379/3").is_ok());
    }

    #[test]
    fn global_keys_are_one_to_the_most_and_above_one_only_in_a_cluster() {
        let cluster = || RedisSettings::cluster(&["redis://10.0.0.1:6379".to_owned()]).unwrap();
        assert_eq!(cluster().global_keys, 1, "one exact key by default");
        assert!(cluster().with_global_keys(3).check().is_ok());
        assert!(cluster().with_global_keys(1024).check().is_ok());
        for keys in [0, 1025] {
            let refused = cluster().with_global_keys(keys).check().unwrap_err();
            assert_eq!(refused.to_string(), "global_keys must be 1 to 1024");
        }
        let standalone = RedisSettings::new("redis://10.0.0.1:6379").with_global_keys(3);
        assert!(standalone
            .check()
            .unwrap_err()
            .to_string()
            .contains("global_keys above 1 is for a Redis Cluster"));
    }

    #[test]
    fn debug_leaves_credentials_and_queries_out() {
        for (url, shown) in [
            ("redis://:s3cret@h:6379/0", "redis://(credentials)@h:6379/0"),
            (
                "redis://u:s3/c@ret@[::1]:6379",
                "redis://(credentials)@[::1]:6379",
            ),
            (
                "redis://h:6379/?password=s3cret",
                "redis://h:6379/?(left out)",
            ),
            (
                "redis+unix:///run/redis.sock?pass=s3cret",
                "redis+unix:///run/redis.sock?(left out)",
            ),
            (":s3cret@h:6379", "(credentials)@h:6379"),
            (
                "rediss+sentinel://a:26379,b:26379/m",
                "rediss+sentinel://a:26379,b:26379/m",
            ),
        ] {
            assert_eq!(without_credentials(url), shown, "{url}");
        }
    }
}
