//! `store` and `store.redis` as written, checked into [`LimitStore`]: where rate-limit state
//! lives, how many keys it holds, and the secret (from a variable or a mounted file) that
//! keys the hash of every stored limit key, which Redis requires.

use std::path::PathBuf;

use reset_guard::{ConfigDuration, ConfigError, OnError, RedisSettings};
use serde::Deserialize;
use zeroize::Zeroizing;

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

/// `store.redis`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Longest a request waits for Redis.
    pub timeout: ConfigDuration,
    /// `allow` or `deny` (503) when Redis cannot answer in time.
    pub on_error: OnError,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            key_prefix: "reset-gateway".to_owned(),
            timeout: ConfigDuration::from_millis(50),
            on_error: OnError::Allow,
        }
    }
}

impl RedisConfig {
    fn validate(&self) -> Result<RedisSettings, ConfigError> {
        let url = &self.url;
        // The client's own message could echo a password in the URL: say only what is wrong.
        RedisSettings::check_url(url).map_err(|_| {
            ConfigError::new(
                "store.redis.url",
                "is not a valid Redis URL: redis://host:port[/db] (TLS, rediss://, is not supported)",
            )
        })?;
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::new(
                "store.redis.key_prefix",
                "must be non-empty, without spaces",
            ));
        }
        if self.timeout.0.is_zero() {
            return Err(ConfigError::new(
                "store.redis.timeout",
                "must be greater than zero",
            ));
        }
        let mut settings = RedisSettings::new(url.clone());
        settings.key_prefix = self.key_prefix.clone();
        settings.timeout = self.timeout.0;
        settings.on_error = self.on_error;
        Ok(settings)
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

fn key_secret(key: &str, value: String) -> Result<Zeroizing<Vec<u8>>, ConfigError> {
    let value = Zeroizing::new(value);
    if value.len() < 16 {
        return Err(ConfigError::new(
            key,
            "the key secret must hold at least 16 characters",
        ));
    }
    Ok(Zeroizing::new(value.as_bytes().to_vec()))
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<LimitStore, ConfigError> {
        if self.max_keys == 0 {
            return Err(ConfigError::new("store.max_keys", "must be at least 1"));
        }
        let key_secret = match (&self.key_secret_file, &self.key_secret_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "store.key_secret_file",
                    "set key_secret_file or key_secret_env, not both",
                ))
            }
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(
                        "store.key_secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Some(key_secret("store.key_secret_file", text.trim().to_owned())?)
            }
            (None, Some(name)) => {
                let value = std::env::var(name).map_err(|_| {
                    ConfigError::new(
                        "store.key_secret_env",
                        format!("environment variable {name} is not set"),
                    )
                })?;
                Some(key_secret("store.key_secret_env", value)?)
            }
            (None, None) => None,
        };
        let redis = match self.kind {
            StoreKind::Memory => None,
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
