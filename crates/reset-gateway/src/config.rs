//! The gateway's YAML file (every key documented in config/gateway.yaml): [`GatewayConfig`]
//! as written, [`Settings`] as run.
//!
//! Each section lives in its own module, as written and as checked: `server` (with `admin`),
//! `upstream` (with the API key), `store` (with `store.redis` and the key secret) and `log`.
//! `guard` is the library's own [`GuardConfig`]. Every type is used as `config::X`.

use std::path::{Path, PathBuf};

use reset_guard::{ApiKey, ConfigError, GuardConfig, GuardSettings};
use serde::Deserialize;

mod log;
mod server;
mod store;
mod upstream;

pub(crate) use log::env_level;
pub use log::{DenialLogging, LogConfig, LogFormat};
pub use server::{
    AdminConfig, CorsConfig, ProxyProtocolConfig, ServerConfig, ServerSettings, TlsConfig,
};
pub use store::{LimitStore, RedisConfig, StoreConfig, StoreKind};
pub use upstream::{UpstreamConfig, UpstreamSettings};

/// Where the file is read from when neither `--config` nor `RESET_GATEWAY_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "config/gateway.yaml";

/// The whole file, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The public listener.
    pub server: ServerConfig,
    /// QuickBlox.
    pub upstream: UpstreamConfig,
    /// The checks; exactly what `reset_guard::GuardConfig` reads.
    pub guard: GuardConfig,
    /// Where rate-limit state lives.
    pub store: StoreConfig,
    /// Logging.
    pub log: LogConfig,
    /// Health, readiness and metrics.
    pub admin: AdminConfig,
}

/// Everything the gateway runs on, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Public listener settings.
    pub server: ServerSettings,
    /// Upstream settings.
    pub upstream: UpstreamSettings,
    /// The guard's settings.
    pub guard: GuardSettings,
    /// The server-held API key.
    pub api_key: ApiKey,
    /// Rate-limit store.
    pub store: LimitStore,
    /// Logging.
    pub log: LogConfig,
    /// The files besides this one that a reload reads again (the API key file, the TLS
    /// certificate and key, `upstream.ca_file`, and the store's secret and Redis files):
    /// a change to one is a change to the configuration (for the store's, one that needs a
    /// restart, which the reload says).
    pub reread_files: Vec<PathBuf>,
}

impl GatewayConfig {
    /// Parses the file's text.
    pub fn from_yaml(yaml: &str) -> Result<GatewayConfig, ConfigError> {
        located_yaml::from_yaml(yaml)
    }

    /// The files besides this one that a reload reads again: [`Settings::reread_files`].
    pub fn reread_files(&self) -> Vec<PathBuf> {
        self.upstream
            .api_key_file
            .iter()
            .chain(self.upstream.ca_file.iter())
            .chain(
                self.server
                    .tls
                    .iter()
                    .flat_map(|tls| [&tls.cert_file, &tls.key_file]),
            )
            .chain(self.store.key_secret_file.iter())
            .chain(
                [
                    &self.store.redis.password_file,
                    &self.store.redis.sentinel_password_file,
                    &self.store.redis.ca_file,
                    &self.store.redis.cert_file,
                    &self.store.redis.key_file,
                ]
                .into_iter()
                .flatten(),
            )
            .cloned()
            .collect()
    }

    /// Checks everything and resolves the API key. `yaml` is the text the config came
    /// from, used to find the line of errors found after parsing.
    pub fn validate(&self, yaml: &str) -> Result<Settings, ConfigError> {
        self.validate_resolving(yaml, || self.upstream.resolve_api_key())
    }

    /// Checks everything, with the API key supplied by the caller (the demo, tests).
    pub fn validate_with_key(&self, yaml: &str, api_key: ApiKey) -> Result<Settings, ConfigError> {
        self.validate_resolving(yaml, || Ok(api_key))
    }

    /// Checks everything, the limits before the API key: a proposal checked where the
    /// production secrets are not shows its own errors first.
    fn validate_resolving(
        &self,
        yaml: &str,
        api_key: impl FnOnce() -> Result<ApiKey, ConfigError>,
    ) -> Result<Settings, ConfigError> {
        let guard = self
            .guard
            .validate()
            .map_err(|e| e.within("guard").located(yaml))?;
        let api_key = api_key().map_err(|e| e.located(yaml))?;
        let upstream = self.upstream.validate().map_err(|e| e.located(yaml))?;
        let store = self.store.validate().map_err(|e| e.located(yaml))?;
        self.log.validate().map_err(|e| e.located(yaml))?;
        let server = self
            .server
            .validate(&self.admin)
            .map_err(|e| e.located(yaml))?;
        if let Some(redis) = &store.limits.redis {
            check_redis_wait_fits(redis, server.request_timeout, upstream.timeout)
                .map_err(|e| e.located(yaml))?;
            global_bursts_fit(&guard, redis.global_keys, "store.redis.global_keys")
                .map_err(|e| e.located(yaml))?;
        }
        let reread_files = self.reread_files();
        Ok(Settings {
            store,
            server,
            upstream,
            guard,
            api_key,
            log: self.log.clone(),
            reread_files,
        })
    }
}

/// A request waits for Redis within its own time (`server.request_timeout`): a longer wait
/// would never end in what `on_error` says, but in the request's timeout, blamed on
/// QuickBlox. The longest is a wait for a new connection: four times the timeout, at least
/// 250ms; and a request decided then (admitted, or passed by `on_error: allow`) still asks
/// QuickBlox, for up to `upstream.timeout`, so that must fit too.
fn check_redis_wait_fits(
    redis: &reset_guard::RedisSettings,
    request_timeout: std::time::Duration,
    upstream_timeout: std::time::Duration,
) -> Result<(), ConfigError> {
    let floor = std::time::Duration::from_millis(250);
    let longest = redis.longest_wait();
    let written = crate::explain::written_duration;
    let then = format!(
        ", and a request then asks QuickBlox for up to upstream.timeout ({})",
        written(upstream_timeout)
    );
    if request_timeout <= floor + upstream_timeout {
        return Err(ConfigError::new(
            "server.request_timeout",
            format!(
                "must be longer than {} with the Redis store: a request waiting for a new \
                 connection to Redis gets {} at least{then}",
                written(floor + upstream_timeout),
                written(floor)
            ),
        ));
    }
    if longest + upstream_timeout >= request_timeout {
        return Err(ConfigError::new(
            "store.redis.timeout",
            format!(
                "must be shorter than server.request_timeout ({}), within which a request \
                 waits for Redis, four times over: a request waiting for a new connection to \
                 Redis gets {} (four times it, at least 250ms){then}. Keep it below {}, or \
                 lengthen server.request_timeout",
                written(request_timeout),
                written(longest),
                written((request_timeout - upstream_timeout) / 4)
            ),
        ));
    }
    Ok(())
}

/// [`check_redis_wait_fits`] for a reload, which applies `upstream.timeout` but keeps the
/// running gateway's `server.request_timeout` and Redis settings (they change only on
/// restart): the error names the one it applies.
pub(crate) fn reloaded_upstream_fits(
    redis: &reset_guard::RedisSettings,
    request_timeout: std::time::Duration,
    upstream_timeout: std::time::Duration,
) -> Result<(), ConfigError> {
    if redis.longest_wait() + upstream_timeout < request_timeout {
        return Ok(());
    }
    let written = crate::explain::written_duration;
    Err(ConfigError::new(
        "upstream.timeout",
        format!(
            "must be below {} with the running gateway's server.request_timeout ({}) and \
             store.redis.timeout (a request waiting for a new connection to Redis gets {}), \
             which change only on restart: a request asks QuickBlox after its wait for Redis",
            written(request_timeout.saturating_sub(redis.longest_wait())),
            written(request_timeout),
            written(redis.longest_wait())
        ),
    ))
}

/// Each global quota's burst at least `keys`, the keys the global group is spread over
/// (`store.redis.global_keys`, as `named`): a key holds 1/N of each quota's burst, and
/// less than one request would refuse every request of its part.
pub(crate) fn global_bursts_fit(
    guard: &reset_guard::GuardSettings,
    keys: u16,
    named: &str,
) -> Result<(), ConfigError> {
    let global = guard.quotas(reset_guard::LimitGroup::Global);
    match global
        .iter()
        .enumerate()
        .find(|(_, quota)| quota.burst < u32::from(keys))
    {
        Some((i, quota)) => Err(ConfigError::new(
            format!("guard.limits.global[{i}]"),
            format!(
                "has a burst of {}, below the {keys} keys the global group is spread over \
                 ({named}): each would hold less than one request; give it a burst of at \
                 least {keys}, or lower global_keys",
                quota.burst
            ),
        )),
        None => Ok(()),
    }
}

/// A file check's error (`key: what is wrong`, as the TLS readers say it) as a config
/// error at that key; at `section` when it names none.
pub(crate) fn located_error(error: &anyhow::Error, section: &str) -> ConfigError {
    let text = format!("{error:#}");
    match text.split_once(": ") {
        Some((key, why)) if key.starts_with(section) && !key.contains(' ') => {
            ConfigError::new(key, why)
        }
        _ => ConfigError::new(section, text),
    }
}

/// Reads, parses and checks the file at `path`.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let yaml = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
    GatewayConfig::from_yaml(&yaml)?.validate(&yaml)
}
