//! The gateway's YAML file (every key documented in config/gateway.yaml): [`GatewayConfig`]
//! as written, [`Settings`] as run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::{HeaderName, AUTHORIZATION, COOKIE, EXPECT, HOST};
use http::Uri;
use reset_guard::ConfigDuration;
use reset_guard::{ApiKey, ConfigError, GuardConfig, GuardSettings, OnError, RedisSettings};
use serde::{de, Deserialize, Deserializer};
use zeroize::Zeroizing;

use crate::header_names::QB_TOKEN;
use crate::hop_by_hop::{is_framing, is_hop_by_hop};

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

/// `admin`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
        }
    }
}

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

/// `server`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the public listener.
    pub listen: SocketAddr,
    /// A client must send its whole request head within this time.
    pub header_read_timeout: ConfigDuration,
    /// How long in-flight requests may run on after SIGTERM.
    pub shutdown_grace: ConfigDuration,
    /// A whole request, head to answer, must be done within this time.
    pub request_timeout: ConfigDuration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Worker threads, each with its own event loop, listener and upstream pool; 0: one per core.
    pub workers: usize,
    /// Largest request head, in bytes; beyond it the answer is 431.
    pub max_header_bytes: usize,
    /// Longest request target (path and query), in bytes; beyond it the answer is 414.
    pub max_uri_bytes: usize,
    /// TLS termination (HTTP/2 and HTTP/1.1 by ALPN).
    pub tls: Option<TlsConfig>,
    /// CORS for browser apps.
    pub cors: CorsConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            header_read_timeout: ConfigDuration::from_secs(5),
            shutdown_grace: ConfigDuration::from_secs(20),
            request_timeout: ConfigDuration::from_secs(30),
            max_connections: 10_000,
            workers: 0,
            max_header_bytes: 16 * 1024,
            max_uri_bytes: 8 * 1024,
            tls: None,
            cors: CorsConfig::default(),
        }
    }
}

/// `server.tls`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// `server.cors`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed to call the gateway from a browser (`https://app.example`); empty: CORS off.
    pub allow_origins: Vec<String>,
    /// How long browsers may cache a preflight answer.
    pub max_age: ConfigDuration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allow_origins: Vec::new(),
            max_age: ConfigDuration::from_secs(600),
        }
    }
}

/// `upstream`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of the QuickBlox API.
    pub url: String,
    /// Environment variable holding the API key.
    pub api_key_env: String,
    /// File holding the API key (takes precedence over the variable).
    pub api_key_file: Option<PathBuf>,
    /// Refused: the key never lives in this file.
    #[serde(deserialize_with = "refuse_api_key")]
    pub api_key: Option<()>,
    /// Extra CA certificates (PEM) trusted for an https upstream.
    pub ca_file: Option<PathBuf>,
    /// Whole-exchange limit: upstream must answer within this time (else 504).
    pub timeout: ConfigDuration,
    /// TCP and TLS connect limit.
    pub connect_timeout: ConfigDuration,
    /// Client headers copied to the upstream request; every other one is dropped.
    pub pass_headers: Vec<String>,
    /// Idle pooled connections kept per upstream host.
    pub pool_max_idle: usize,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: ConfigDuration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "https://api.quickblox.com".to_owned(),
            api_key_env: "QB_API_KEY".to_owned(),
            api_key_file: None,
            api_key: None,
            ca_file: None,
            timeout: ConfigDuration::from_secs(5),
            connect_timeout: ConfigDuration::from_secs(2),
            pass_headers: vec!["User-Agent".to_owned(), "Accept-Language".to_owned()],
            pool_max_idle: 64,
            pool_idle_timeout: ConfigDuration::from_secs(60),
        }
    }
}

fn refuse_api_key<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<()>, D::Error> {
    // Read and discard the value without ever putting it into a message.
    let _ = de::IgnoredAny::deserialize(deserializer)?;
    Err(de::Error::custom(
        "the API key must not be written in the file: set upstream.api_key_env or upstream.api_key_file",
    ))
}

/// `log`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` (one object per line) or `text`.
    pub format: LogFormat,
    /// Default level filter; `RUST_LOG` overrides it.
    pub level: String,
    /// Put the raw address in request logs (off: a short hash only).
    pub include_email: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".to_owned(),
            include_email: false,
        }
    }
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable lines.
    Text,
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
    pub store: StoreSettings,
    /// Logging.
    pub log: LogConfig,
}

/// Checked `store` section.
#[derive(Clone)]
pub struct StoreSettings {
    /// Bounds and housekeeping.
    pub limits: reset_guard::StoreSettings,
    /// Secret keying the limit-key hash, if configured.
    pub key_secret: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
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
    fn validate(&self) -> Result<StoreSettings, ConfigError> {
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
        Ok(StoreSettings { limits, key_secret })
    }
}

/// Checked `server` section.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Public listener.
    pub listen: SocketAddr,
    /// Request head deadline.
    pub header_read_timeout: Duration,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// Whole-request deadline.
    pub request_timeout: Duration,
    /// Connections at once.
    pub max_connections: usize,
    /// Worker threads.
    pub workers: usize,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Longest request target.
    pub max_uri_bytes: usize,
    /// TLS files, if TLS is on.
    pub tls: Option<TlsConfig>,
    /// Allowed CORS origins (empty: off) and preflight cache time.
    pub cors_origins: Vec<http::HeaderValue>,
    /// Preflight cache time.
    pub cors_max_age: Duration,
    /// Admin listener.
    pub admin_listen: SocketAddr,
}

/// Checked `upstream` section.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// Scheme and authority, plus any path prefix without a trailing slash.
    pub base: String,
    /// Extra trusted CA certificates file.
    pub ca_file: Option<PathBuf>,
    /// Whole-exchange limit.
    pub timeout: Duration,
    /// Connect limit.
    pub connect_timeout: Duration,
    /// Headers copied from the client.
    pub pass_headers: Vec<HeaderName>,
    /// Idle connections kept.
    pub pool_max_idle: usize,
    /// Idle connection lifetime.
    pub pool_idle_timeout: Duration,
}

impl GatewayConfig {
    /// Parses the file's text.
    pub fn from_yaml(yaml: &str) -> Result<GatewayConfig, ConfigError> {
        located_yaml::from_yaml(yaml)
    }

    /// Checks everything and resolves the API key. `yaml` is the text the config came
    /// from, used to find the line of errors found after parsing.
    pub fn validate(&self, yaml: &str) -> Result<Settings, ConfigError> {
        let api_key = self
            .upstream
            .resolve_api_key()
            .map_err(|e| e.located(yaml))?;
        self.validate_with_key(yaml, api_key)
    }

    /// Checks everything, with the API key supplied by the caller (the demo, tests).
    pub fn validate_with_key(&self, yaml: &str, api_key: ApiKey) -> Result<Settings, ConfigError> {
        let guard = self
            .guard
            .validate()
            .map_err(|e| e.within("guard").located(yaml))?;
        let upstream = self.upstream.validate().map_err(|e| e.located(yaml))?;
        let store = self.store.validate().map_err(|e| e.located(yaml))?;
        Ok(Settings {
            store,
            server: self
                .server
                .validate(&self.admin)
                .map_err(|e| e.located(yaml))?,
            upstream,
            guard,
            api_key,
            log: self.log.clone(),
        })
    }
}

impl ServerConfig {
    fn validate(&self, admin: &AdminConfig) -> Result<ServerSettings, ConfigError> {
        if self.workers > 1024 {
            return Err(ConfigError::new("server.workers", "at most 1024"));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::new(
                "server.max_connections",
                "must be at least 1",
            ));
        }
        if !(256..=self.max_header_bytes).contains(&self.max_uri_bytes) {
            return Err(ConfigError::new(
                "server.max_uri_bytes",
                "must be 256 to server.max_header_bytes",
            ));
        }
        if !(8192..=1024 * 1024).contains(&self.max_header_bytes) {
            return Err(ConfigError::new(
                "server.max_header_bytes",
                "must be 8192 to 1048576",
            ));
        }
        for (key, value) in [
            ("server.header_read_timeout", self.header_read_timeout),
            ("server.request_timeout", self.request_timeout),
        ] {
            if value.0.is_zero() {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [
                ("server.tls.cert_file", &tls.cert_file),
                ("server.tls.key_file", &tls.key_file),
            ] {
                if !path.is_file() {
                    return Err(ConfigError::new(
                        key,
                        format!("{} is not a readable file", path.display()),
                    ));
                }
            }
        }
        let mut cors_origins = Vec::new();
        for (i, origin) in self.cors.allow_origins.iter().enumerate() {
            let valid = origin.parse::<Uri>().ok().filter(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.path() == "/"
                    && !origin.ends_with('/')
            });
            let value = valid
                .and_then(|_| http::HeaderValue::from_str(origin).ok())
                .ok_or_else(|| {
                    ConfigError::new(
                        format!("server.cors.allow_origins[{i}]"),
                        format!("{origin:?} is not an origin like https://app.example"),
                    )
                })?;
            cors_origins.push(value);
        }
        if admin.listen == self.listen && self.listen.port() != 0 {
            return Err(ConfigError::new(
                "admin.listen",
                "must differ from server.listen",
            ));
        }
        Ok(ServerSettings {
            listen: self.listen,
            header_read_timeout: self.header_read_timeout.0,
            shutdown_grace: self.shutdown_grace.0,
            request_timeout: self.request_timeout.0,
            max_connections: self.max_connections,
            workers: match self.workers {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            },
            max_header_bytes: self.max_header_bytes,
            max_uri_bytes: self.max_uri_bytes,
            tls: self.tls.clone(),
            cors_origins,
            cors_max_age: self.cors.max_age.0,
            admin_listen: admin.listen,
        })
    }
}

/// Headers the gateway sets itself or must never forward, whatever `pass_headers` says.
fn never_passed(name: &HeaderName) -> bool {
    name == AUTHORIZATION
        || name == COOKIE
        || name == HOST
        || name == QB_TOKEN
        || name.as_str() == "x-forwarded-for"
        || name.as_str() == "x-request-id"
        || name == EXPECT
        || is_hop_by_hop(name)
        || is_framing(name)
}

impl UpstreamConfig {
    fn validate(&self) -> Result<UpstreamSettings, ConfigError> {
        let uri: Uri = self.url.parse().map_err(|_| {
            ConfigError::new("upstream.url", format!("{:?} is not a URL", self.url))
        })?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(ConfigError::new(
                    "upstream.url",
                    "must start with http:// or https://",
                ))
            }
        }
        if uri.authority().is_none() || uri.query().is_some() {
            return Err(ConfigError::new(
                "upstream.url",
                "must be scheme://host[:port][/prefix] without a query",
            ));
        }
        if self.timeout.0.is_zero() || self.connect_timeout.0.is_zero() {
            return Err(ConfigError::new(
                "upstream.timeout",
                "timeouts must be greater than zero",
            ));
        }
        let mut pass_headers = Vec::new();
        for (i, name) in self.pass_headers.iter().enumerate() {
            let header = HeaderName::try_from(name.as_str()).map_err(|_| {
                ConfigError::new(
                    format!("upstream.pass_headers[{i}]"),
                    format!("{name:?} is not a header name"),
                )
            })?;
            if header.as_str().contains('_') {
                return Err(ConfigError::new(
                    format!("upstream.pass_headers[{i}]"),
                    "header names with underscores are dropped, never forwarded",
                ));
            }
            if never_passed(&header) {
                return Err(ConfigError::new(
                    format!("upstream.pass_headers[{i}]"),
                    format!("{name} is set by the gateway or never forwarded"),
                ));
            }
            pass_headers.push(header);
        }
        if let Some(path) = &self.ca_file {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "upstream.ca_file",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        Ok(UpstreamSettings {
            base: self.url.trim_end_matches('/').to_owned(),
            ca_file: self.ca_file.clone(),
            timeout: self.timeout.0,
            connect_timeout: self.connect_timeout.0,
            pass_headers,
            pool_max_idle: self.pool_max_idle,
            pool_idle_timeout: self.pool_idle_timeout.0,
        })
    }

    /// Reads the key from `api_key_file`, else from the variable `api_key_env`.
    pub fn resolve_api_key(&self) -> Result<ApiKey, ConfigError> {
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "upstream.api_key_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            return ApiKey::new(text).map_err(|e| {
                ConfigError::new("upstream.api_key_file", format!("{}: {e}", path.display()))
            });
        }
        let name = &self.api_key_env;
        let value = std::env::var(name).map_err(|_| {
            ConfigError::new(
                "upstream.api_key_env",
                format!(
                    "environment variable {name} is not set (it must hold the QuickBlox API key)"
                ),
            )
        })?;
        ApiKey::new(value)
            .map_err(|e| ConfigError::new("upstream.api_key_env", format!("{name}: {e}")))
    }
}

/// Reads, parses and checks the file at `path`.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let yaml = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
    GatewayConfig::from_yaml(&yaml)?.validate(&yaml)
}
