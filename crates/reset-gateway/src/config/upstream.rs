//! `upstream` as written, checked into [`UpstreamSettings`]: where QuickBlox is, how long to
//! wait for it, which client headers it may see (never those in `never_passed`), and where
//! the API key is read from; the key itself is refused in the file.

use std::path::PathBuf;
use std::time::Duration;

use http::header::{HeaderName, ACCEPT_ENCODING, AUTHORIZATION, COOKIE, EXPECT, HOST};
use http::Uri;
use reset_guard::{ApiKey, ConfigDuration, ConfigError};
use serde::{de, Deserialize, Deserializer};

use crate::header_names::QB_TOKEN;
use crate::hop_by_hop::{is_framing, is_hop_by_hop};

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
    refuse_secret(
        deserializer,
        "the API key must not be written in the file: set upstream.api_key_env or upstream.api_key_file",
    )
}

/// Refuses a key that would hold a secret in the file, saying `why`: the value is read and
/// discarded without ever being put into a message.
pub(super) fn refuse_secret<'de, D: Deserializer<'de>>(
    deserializer: D,
    why: &'static str,
) -> Result<Option<()>, D::Error> {
    let _ = de::IgnoredAny::deserialize(deserializer)?;
    Err(de::Error::custom(why))
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

/// Headers the gateway sets itself or must never forward, whatever `pass_headers` says.
/// `Accept-Encoding` among them: QuickBlox's answer is read, checked and passed on as it
/// is, so it must come uncompressed.
fn never_passed(name: &HeaderName) -> bool {
    name == AUTHORIZATION
        || name == ACCEPT_ENCODING
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
    pub(super) fn validate(&self) -> Result<UpstreamSettings, ConfigError> {
        // A URL that may hold `user:password@` is never repeated.
        let uri: Uri = self.url.parse().map_err(|_| {
            let shown = match self.url.contains('@') {
                true => "the URL".to_owned(),
                false => format!("{:?}", self.url),
            };
            ConfigError::new("upstream.url", format!("{shown} is not a URL"))
        })?;
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(ConfigError::new(
                "upstream.url",
                "must not hold credentials (user:password@): QuickBlox is asked with the API key",
            ));
        }
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
        for (key, timeout) in [
            ("upstream.timeout", self.timeout.0),
            ("upstream.connect_timeout", self.connect_timeout.0),
        ] {
            if timeout.is_zero() {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
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
            crate::tls::read_certificates("upstream.ca_file", path)
                .map_err(|e| super::located_error(&e, "upstream.ca_file"))?;
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
            // The path is not echoed: a key pasted here by mistake would be.
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "upstream.api_key_file",
                    format!("cannot read the file it names: {e}"),
                )
            })?;
            return ApiKey::new(text).map_err(|e| {
                ConfigError::new("upstream.api_key_file", format!("the file's key: {e}"))
            });
        }
        let name = &self.api_key_env;
        let default = *name == UpstreamConfig::default().api_key_env;
        let value =
            super::store::read_env("upstream.api_key_env", name, default).map_err(|mut e| {
                if e.message.ends_with("is not set") {
                    e.message.push_str(" (it must hold the QuickBlox API key)");
                }
                e
            })?;
        ApiKey::new(value).map_err(|e| {
            let variable = if default {
                name.as_str()
            } else {
                "its variable"
            };
            ConfigError::new("upstream.api_key_env", format!("{variable}: {e}"))
        })
    }
}
