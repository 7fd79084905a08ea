//! `store` and `store.redis` as written, checked into [`LimitStore`]: where rate-limit state
//! lives, how many keys it holds, and the secret (from a variable or a mounted file) that
//! keys the hash of every stored limit key, which Redis requires.

use std::path::{Path, PathBuf};

use reset_guard::{ConfigDuration, ConfigError, OnError, RedisSettings, MAX_GLOBAL_KEYS};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::tls::certificates_in;

/// `store`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `memory`: limits held in this process.
    pub kind: StoreKind,
    /// Most keys each quota tracks; idle keys are forgotten first.
    pub max_keys: usize,
    /// Environment variable holding a secret that keys the hash of stored limit keys.
    pub key_secret_env: Option<String>,
    /// File holding that secret (a mounted secret), instead of the variable.
    pub key_secret_file: Option<PathBuf>,
    /// The Redis server, for `kind: redis`.
    pub redis: RedisConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Memory,
            max_keys: 1_000_000,
            key_secret_env: None,
            key_secret_file: None,
            redis: RedisConfig::default(),
        }
    }
}

/// `store.kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In this process.
    #[default]
    Memory,
    /// Shared by every replica through Redis.
    Redis,
}

/// `store.redis.url` unless set.
const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// `store.redis.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server at `url`.
    #[default]
    Standalone,
    /// The master the sentinels at `nodes` name `sentinel_master`, followed across failovers.
    Sentinel,
    /// The Redis Cluster the seed `nodes` belong to; each group decided in its own slot.
    Cluster,
}

/// `store.redis`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `standalone` (the server at `url`), `sentinel` (the master the sentinels name) or
    /// `cluster` (the Redis Cluster the seed `nodes` belong to).
    pub mode: RedisMode,
    /// `redis://host:port[/db]`, or `rediss://` for TLS; never with a password in it.
    /// Standalone only; `redis://127.0.0.1:6379` when not written.
    pub url: Option<String>,
    /// Sentinel mode: the sentinels; cluster mode: seed nodes of the cluster.
    /// `redis://host:port` (all `rediss://` for TLS).
    pub nodes: Option<Vec<String>>,
    /// Sentinel mode: the name the sentinels know the master by.
    pub sentinel_master: Option<String>,
    /// The ACL user (Redis 6+).
    pub username: Option<String>,
    /// Refused: the password never lives in this file.
    #[serde(deserialize_with = "refuse_password")]
    pub password: Option<()>,
    /// Environment variable holding the Redis password.
    pub password_env: Option<String>,
    /// File holding the Redis password (a mounted secret), instead of the variable.
    pub password_file: Option<PathBuf>,
    /// Sentinel mode: the sentinels' own ACL user, where they have one.
    pub sentinel_username: Option<String>,
    /// Refused: the sentinels' password never lives in this file either.
    #[serde(deserialize_with = "refuse_sentinel_password")]
    pub sentinel_password: Option<()>,
    /// Sentinel mode: the variable holding the sentinels' own password (their
    /// `requirepass`), where it differs from the master's.
    pub sentinel_password_env: Option<String>,
    /// Sentinel mode: the file holding it, instead of the variable.
    pub sentinel_password_file: Option<PathBuf>,
    /// PEM certificates of a private CA for `rediss://` (then only these are trusted).
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM chain) for `rediss://` servers that ask for one.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's PEM private key.
    pub key_file: Option<PathBuf>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Longest a request waits for Redis.
    pub timeout: ConfigDuration,
    /// `allow` or `deny` (503) when Redis cannot answer in time.
    pub on_error: OnError,
    /// Cluster mode: how many keys the global group is spread over (1: one exact key).
    pub global_keys: u16,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            mode: RedisMode::Standalone,
            url: None,
            nodes: None,
            sentinel_master: None,
            username: None,
            password: None,
            password_env: None,
            password_file: None,
            sentinel_username: None,
            sentinel_password: None,
            sentinel_password_env: None,
            sentinel_password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_prefix: "reset-gateway".to_owned(),
            timeout: ConfigDuration::from_millis(50),
            on_error: OnError::Allow,
            global_keys: 1,
        }
    }
}

impl RedisConfig {
    /// Where Redis is, as `mode` says; errors say what is wrong without repeating a URL,
    /// which may hold a password.
    fn target(&self) -> Result<RedisSettings, ConfigError> {
        match self.mode {
            RedisMode::Cluster => {
                if self.url.is_some() {
                    return Err(ConfigError::new(
                        "store.redis.url",
                        "is for mode: standalone; in cluster mode the seed nodes go in nodes",
                    ));
                }
                if self.sentinel_master.is_some() {
                    return Err(ConfigError::new(
                        "store.redis.sentinel_master",
                        "is for mode: sentinel",
                    ));
                }
                if self.key_prefix.contains(['{', '}']) {
                    return Err(ConfigError::new(
                        "store.redis.key_prefix",
                        "in cluster mode, must not hold `{` or `}` (the keys' hash tags)",
                    ));
                }
                let nodes = self.nodes.as_deref().unwrap_or_default();
                if nodes.is_empty() {
                    return Err(ConfigError::new(
                        "store.redis.nodes",
                        "mode: cluster needs seed nodes: nodes: [redis://host:6379, ...]",
                    ));
                }
                RedisSettings::cluster(nodes).map_err(|why| {
                    ConfigError::new("store.redis.nodes", with_hint(&why.to_string()))
                })
            }
            RedisMode::Standalone => {
                let not_standalone = [
                    (
                        "store.redis.nodes",
                        self.nodes.is_some(),
                        "is for mode: sentinel or cluster (standalone reaches the server at url)",
                    ),
                    (
                        "store.redis.sentinel_master",
                        self.sentinel_master.is_some(),
                        "is for mode: sentinel (standalone reaches the server at url)",
                    ),
                ];
                if let Some((key, _, why)) = not_standalone.into_iter().find(|(_, set, _)| *set) {
                    return Err(ConfigError::new(key, why));
                }
                let url = self.url.as_deref().unwrap_or(DEFAULT_URL);
                // The library reads redis+sentinel:// and redis+cluster:// URLs as those modes:
                // here they would skip the checks `mode:` makes.
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(ConfigError::new(
                        "store.redis.url",
                        "must start with redis:// or rediss:// (Sentinel and Cluster are set \
                         with mode: and nodes:)",
                    ));
                }
                RedisSettings::check_url(url)
                    .map_err(|why| ConfigError::new("store.redis.url", with_hint(why)))?;
                Ok(RedisSettings::new(url))
            }
            RedisMode::Sentinel => {
                if self.url.is_some() {
                    return Err(ConfigError::new(
                        "store.redis.url",
                        "is for mode: standalone; in sentinel mode the master's address comes \
                         from the sentinels",
                    ));
                }
                let nodes = self.nodes.as_deref().unwrap_or_default();
                if nodes.is_empty() {
                    return Err(ConfigError::new(
                        "store.redis.nodes",
                        "mode: sentinel needs the sentinels: nodes: [redis://host:26379, ...]",
                    ));
                }
                let Some(master) = &self.sentinel_master else {
                    return Err(ConfigError::new(
                        "store.redis.sentinel_master",
                        "mode: sentinel needs the name the sentinels know the master by",
                    ));
                };
                RedisSettings::sentinel(nodes, master).map_err(|why| {
                    let why = why.to_string();
                    let key = if why.starts_with("node") {
                        "store.redis.nodes"
                    } else {
                        "store.redis.sentinel_master"
                    };
                    ConfigError::new(key, with_sentinel_hint(&why))
                })
            }
        }
    }

    /// The values the file alone decides (no secret read, no server asked): checked for
    /// `kind: memory` too, so that a section that could not work is found before the day
    /// `kind` turns to redis.
    fn check_values(&self) -> Result<(), ConfigError> {
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::new(
                "store.redis.key_prefix",
                "must be non-empty, without spaces",
            ));
        }
        // An ACL grants keys by pattern (`~prefix:*`): a glob character in the prefix
        // would grant the gateway's user other keys too.
        if self.key_prefix.contains(['*', '?', '[', ']', '\\']) {
            return Err(ConfigError::new(
                "store.redis.key_prefix",
                "must not hold a glob character (* ? [ ] \\): a Redis ACL grants keys by a pattern made from it",
            ));
        }
        if self.timeout.0.is_zero() || self.timeout.0 > std::time::Duration::from_secs(60) {
            return Err(ConfigError::new(
                "store.redis.timeout",
                "must be 1ms to 60s",
            ));
        }
        if self.username.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::new(
                "store.redis.username",
                "must be non-empty (leave it out for the default user)",
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<RedisSettings, ConfigError> {
        let mut settings = self.target()?;
        self.check_global_keys()?;
        self.check_values()?;
        let tls = settings.url.starts_with("rediss");
        settings.username = self.username.clone();
        settings.password = env_or_file(
            "store.redis.password",
            self.password_env.as_deref(),
            self.password_file.as_deref(),
        )?
        .map(|(_, password)| password);
        if settings.username.is_some() && settings.password.is_none() {
            // Redis would answer every call NOAUTH: the user is only sent with a password.
            return Err(ConfigError::new(
                "store.redis.username",
                "needs a password: set store.redis.password_env or password_file (for an ACL user with nopass, any value)",
            ));
        }
        if let Some(path) = &self.ca_file {
            if !tls {
                return Err(ConfigError::new(
                    "store.redis.ca_file",
                    "is for TLS: the URL (in sentinel and cluster mode, every node) must start with rediss://",
                ));
            }
            // Read once: the bytes checked are the bytes the store is given.
            let pem = std::fs::read(path).map_err(|e| {
                ConfigError::new(
                    "store.redis.ca_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            certificates_in("store.redis.ca_file", path, &pem)
                .map_err(|e| super::located_error(&e, "store.redis.ca_file"))?;
            settings.ca_pem = Some(pem);
        }
        match (&self.cert_file, &self.key_file) {
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                let missing = match self.cert_file {
                    None => "store.redis.cert_file",
                    Some(_) => "store.redis.key_file",
                };
                return Err(ConfigError::new(
                    missing,
                    "a client certificate needs both store.redis.cert_file and key_file",
                ));
            }
            (Some(cert_file), Some(key_file)) => {
                if !tls {
                    return Err(ConfigError::new(
                        "store.redis.cert_file",
                        "is for TLS: the URL (in sentinel and cluster mode, every node) must start with rediss://",
                    ));
                }
                let read = |key: &str, path: &Path| {
                    std::fs::read(path).map_err(|e| {
                        ConfigError::new(key, format!("cannot read {}: {e}", path.display()))
                    })
                };
                let cert = read("store.redis.cert_file", cert_file)?;
                // The path is not echoed: a private key pasted in its place would be.
                let key = std::fs::read(key_file).map_err(|e| {
                    ConfigError::new(
                        "store.redis.key_file",
                        format!("cannot read the file it names: {e}"),
                    )
                })?;
                crate::tls::certified_key_in("store.redis", (cert_file, &cert), (key_file, &key))
                    .map_err(|e| super::located_error(&e, "store.redis"))?;
                settings = settings.with_client_certificate(cert, key);
            }
        }
        settings.sentinel_auth = self.sentinel_auth()?;
        settings.key_prefix = self.key_prefix.clone();
        settings.timeout = self.timeout.0;
        settings.on_error = self.on_error;
        settings.global_keys = self.global_keys;
        // What the store is built with is checked again when it is built: check-config
        // refuses here whatever that would (a password with a line break inside).
        settings
            .check()
            .map_err(|why| ConfigError::new("store.redis", why.to_string()))?;
        Ok(settings)
    }
}

/// The sentinels' own username (none: their default user) and password.
type SentinelAuth = (Option<String>, Zeroizing<String>);

impl RedisConfig {
    /// The sentinels' own username and password, where given (sentinel mode only; a
    /// username only with a password, as for the master).
    fn sentinel_auth(&self) -> Result<Option<SentinelAuth>, ConfigError> {
        let set = [
            (
                "store.redis.sentinel_username",
                self.sentinel_username.is_some(),
            ),
            (
                "store.redis.sentinel_password_env",
                self.sentinel_password_env.is_some(),
            ),
            (
                "store.redis.sentinel_password_file",
                self.sentinel_password_file.is_some(),
            ),
        ];
        if self.mode != RedisMode::Sentinel {
            if let Some((key, _)) = set.into_iter().find(|(_, set)| *set) {
                return Err(ConfigError::new(
                    key,
                    "is for mode: sentinel (the sentinels' own credentials)",
                ));
            }
        }
        let password = env_or_file(
            "store.redis.sentinel_password",
            self.sentinel_password_env.as_deref(),
            self.sentinel_password_file.as_deref(),
        )?;
        if self.sentinel_username.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::new(
                "store.redis.sentinel_username",
                "must be non-empty (leave it out for the sentinels' default user)",
            ));
        }
        match password {
            Some((_, password)) => Ok(Some((self.sentinel_username.clone(), password))),
            None if self.sentinel_username.is_some() => Err(ConfigError::new(
                "store.redis.sentinel_username",
                "needs a password: set store.redis.sentinel_password_env or sentinel_password_file",
            )),
            None => Ok(None),
        }
    }

    /// `global_keys`: 1 to the most, and above 1 only in cluster mode.
    pub(crate) fn check_global_keys(&self) -> Result<(), ConfigError> {
        if self.global_keys == 0 || self.global_keys > MAX_GLOBAL_KEYS {
            return Err(ConfigError::new(
                "store.redis.global_keys",
                format!("must be 1 to {MAX_GLOBAL_KEYS}"),
            ));
        }
        if self.global_keys > 1 && self.mode != RedisMode::Cluster {
            return Err(ConfigError::new(
                "store.redis.global_keys",
                "is for mode: cluster, where it spreads the one global key over the masters (one server holds it at no extra cost)",
            ));
        }
        Ok(())
    }
}

/// Refuses `store.redis.password`, never echoing its value.
fn refuse_password<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<()>, D::Error> {
    super::upstream::refuse_secret(
        deserializer,
        "the Redis password must not be written in the file: set store.redis.password_env or password_file",
    )
}

/// Refuses `store.redis.sentinel_password`, never echoing its value.
fn refuse_sentinel_password<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<()>, D::Error> {
    super::upstream::refuse_secret(
        deserializer,
        "the sentinels' password must not be written in the file: set store.redis.sentinel_password_env or sentinel_password_file",
    )
}

/// A sentinel's URL's error, with where the sentinels' own password or user goes in this
/// file when it is about one.
fn with_sentinel_hint(why: &str) -> String {
    if why.contains("holds a password") {
        format!("{why}: set store.redis.sentinel_password_env or sentinel_password_file")
    } else if why.contains("holds a user name") {
        format!("{why}: set store.redis.sentinel_username")
    } else {
        why.to_owned()
    }
}

/// A Redis URL's error, with where a password or user goes in this file when it is about one.
fn with_hint(why: &str) -> String {
    if why.contains("password") {
        format!("{why}: set store.redis.password_env or password_file")
    } else if why.contains("user name") {
        format!("{why}: set store.redis.username")
    } else {
        why.to_owned()
    }
}

/// Checked `store` section: the rate-limit store the guard is built with, and the secret
/// keying the hash of its keys. Not the guard's [`reset_guard::StoreSettings`], which is only
/// the `limits` part.
#[derive(Clone)]
pub struct LimitStore {
    /// Bounds and housekeeping.
    pub limits: reset_guard::StoreSettings,
    /// Secret keying the limit-key hash, if configured.
    pub key_secret: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for LimitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitStore")
            .field("limits", &self.limits)
            .field("key_secret", &self.key_secret.as_ref().map(|_| "<secret>"))
            .finish()
    }
}

fn key_secret(key: &str, value: Zeroizing<String>) -> Result<Zeroizing<Vec<u8>>, ConfigError> {
    if value.len() < 16 {
        return Err(ConfigError::new(
            key,
            "the key secret must hold at least 16 characters",
        ));
    }
    Ok(Zeroizing::new(value.as_bytes().to_vec()))
}

impl RedisConfig {
    /// The first key of this section that says which Redis server to use or how to reach
    /// it, if any (the rest have defaults that name none).
    fn names_a_server(&self) -> Option<&'static str> {
        [
            ("url", self.url.is_some()),
            ("nodes", self.nodes.is_some()),
            ("sentinel_master", self.sentinel_master.is_some()),
            ("username", self.username.is_some()),
            ("password_env", self.password_env.is_some()),
            ("password_file", self.password_file.is_some()),
            ("sentinel_username", self.sentinel_username.is_some()),
            (
                "sentinel_password_env",
                self.sentinel_password_env.is_some(),
            ),
            (
                "sentinel_password_file",
                self.sentinel_password_file.is_some(),
            ),
            ("ca_file", self.ca_file.is_some()),
            ("cert_file", self.cert_file.is_some()),
            ("key_file", self.key_file.is_some()),
            ("mode", self.mode != RedisMode::Standalone),
        ]
        .into_iter()
        .find_map(|(key, set)| set.then_some(key))
    }
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<LimitStore, ConfigError> {
        if self.max_keys == 0 {
            return Err(ConfigError::new("store.max_keys", "must be at least 1"));
        }
        let key_secret = env_or_file(
            "store.key_secret",
            self.key_secret_env.as_deref(),
            self.key_secret_file.as_deref(),
        )?
        .map(|(key, value)| key_secret(&key, value))
        .transpose()?;
        let redis = match self.kind {
            // Unused, but checked as far as the file alone goes (no secret is read): a
            // password written in a URL is refused whatever the kind, and a section that
            // could not work is found before the day kind turns to redis.
            StoreKind::Memory => {
                self.redis.target()?;
                self.redis.check_global_keys()?;
                self.redis.check_values()?;
                if let Some(key) = self.redis.names_a_server() {
                    // Left at memory (the default) by mistake, every replica would keep a
                    // limit of its own while the file says where the shared one is.
                    return Err(ConfigError::new(
                        "store.kind",
                        format!(
                            "is memory (the default), but store.redis.{key} names a Redis \
                             server: set `kind: redis` to keep limits there, shared by every \
                             replica, or leave the Redis server out of store.redis"
                        ),
                    ));
                }
                None
            }
            StoreKind::Redis => Some(self.redis.validate()?),
        };
        if redis.is_some() && key_secret.is_none() {
            // Unkeyed hashes of addresses are reversed with a dictionary, and replicas that
            // hash with different keys silently keep separate limits.
            return Err(ConfigError::new(
                "store.key_secret_env",
                "store.kind redis needs store.key_secret_env or store.key_secret_file: the \
                 same secret of 16+ characters on every replica, so stored keys cannot be \
                 reversed and all replicas share one limit",
            ));
        }
        let mut limits = reset_guard::StoreSettings::default();
        limits.max_keys = self.max_keys;
        limits.redis = redis;
        Ok(LimitStore { limits, key_secret })
    }
}

/// A secret the file names but does not hold: in the environment variable `env` or the
/// file `file` (a mounted secret; surrounding whitespace ignored), never both. Returns
/// the key path it came from, for errors about its value.
fn env_or_file(
    key: &str,
    env: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<(String, Zeroizing<String>)>, ConfigError> {
    let (env_key, file_key) = (format!("{key}_env"), format!("{key}_file"));
    match (env, file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            &file_key,
            format!("set {file_key} or {env_key}, not both"),
        )),
        (None, Some(path)) => {
            // The path is not echoed: a secret pasted here by mistake would be.
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(&file_key, format!("cannot read the file it names: {e}"))
            })?);
            let value = Zeroizing::new(text.trim().to_owned());
            if value.is_empty() {
                return Err(ConfigError::new(
                    &file_key,
                    format!("{} is empty", path.display()),
                ));
            }
            Ok(Some((file_key, value)))
        }
        (Some(name), None) => {
            // Trimmed as a file's is: a secret made from a file (`kubectl create secret
            // --from-file`) keeps its newline in the variable, and one replica reading it
            // from the variable and another from the mounted file must derive the same keys.
            let raw = Zeroizing::new(read_env(&env_key, name, false)?);
            let value = Zeroizing::new(raw.trim().to_owned());
            if value.is_empty() {
                return Err(ConfigError::new(
                    &env_key,
                    "the environment variable it names is empty",
                ));
            }
            Ok(Some((env_key, value)))
        }
        (None, None) => Ok(None),
    }
}

/// The value of the environment variable `name`, which the key `key` names. A name written
/// in the file is not repeated in errors (it could be a secret written where its variable's
/// name belongs; the key's line points at it); a `default` name, which the file does not
/// hold, is.
pub(super) fn read_env(key: &str, name: &str, default: bool) -> Result<String, ConfigError> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(ConfigError::new(key, "must name an environment variable"));
    }
    let variable = match default {
        true => format!("environment variable {name}"),
        false => "the environment variable it names".to_owned(),
    };
    std::env::var(name).map_err(|e| {
        let why = match e {
            std::env::VarError::NotPresent => "is not set",
            std::env::VarError::NotUnicode(_) => "is not valid UTF-8",
        };
        ConfigError::new(key, format!("{variable} {why}"))
    })
}
