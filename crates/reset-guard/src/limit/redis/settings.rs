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

/// Where and how to reach Redis.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisSettings {
    /// `redis://host:port[/db]`, or `rediss://` for TLS; a password goes in
    /// [`password`](Self::password), never in the URL.
    pub url: String,
    /// The ACL user (Redis 6+); none: the default user.
    pub username: Option<String>,
    /// The password sent with `AUTH`.
    pub password: Option<Zeroizing<String>>,
    /// PEM certificates of a private CA that Redis's TLS certificate chains to; then only
    /// these are trusted for Redis (none: the public web PKI roots).
    pub ca_pem: Option<Vec<u8>>,
    /// Prepended to every key, so several deployments can share one server.
    pub key_prefix: String,
    /// Longest a request waits for Redis.
    pub timeout: Duration,
    /// What happens when Redis cannot answer in time.
    pub on_error: OnError,
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "(set)"))
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "(set)"))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}

impl RedisSettings {
    /// The server at `url`, with the key prefix `reset-gateway`, a 50ms timeout and
    /// `on_error: allow`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisSettings {
            url: url.into(),
            username: None,
            password: None,
            ca_pem: None,
            key_prefix: "reset-gateway".to_owned(),
            timeout: Duration::from_millis(50),
            on_error: OnError::Allow,
        }
    }

    /// Whether the client accepts `url` (checked without connecting) and it carries no
    /// password; the error says what is wrong without repeating the URL, which may hold
    /// a secret.
    pub fn check_url(url: &str) -> Result<(), &'static str> {
        let info = url.into_connection_info().map_err(|_| {
            "is not a valid Redis URL: redis://host:port[/db], or rediss:// for TLS"
        })?;
        if info.redis_settings().password().is_some() {
            return Err("holds a password: set store.redis.password_env or password_file instead");
        }
        Ok(())
    }

    /// The client for these settings: the URL's address and database, the username and
    /// password given apart from it, TLS through rustls with `ca_pem` when set.
    pub(crate) fn client(&self) -> redis::RedisResult<redis::Client> {
        let info = self.url.as_str().into_connection_info()?;
        let mut handshake = info.redis_settings().clone();
        if let Some(username) = &self.username {
            handshake = handshake.set_username(username);
        }
        if let Some(password) = &self.password {
            handshake = handshake.set_password(password.as_str());
        }
        let info = info.set_redis_settings(handshake);
        match &self.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => redis::Client::open(info),
        }
    }
}
