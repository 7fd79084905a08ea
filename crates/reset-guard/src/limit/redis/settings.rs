//! Where and how to reach Redis, and what a request gets when it cannot.

use std::time::Duration;

use serde::Deserialize;

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
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prepended to every key, so several deployments can share one server.
    pub key_prefix: String,
    /// Longest a request waits for Redis.
    pub timeout: Duration,
    /// What happens when Redis cannot answer in time.
    pub on_error: OnError,
}

impl RedisSettings {
    /// The server at `url`, with the key prefix `reset-gateway`, a 50ms timeout and
    /// `on_error: allow`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisSettings {
            url: url.into(),
            key_prefix: "reset-gateway".to_owned(),
            timeout: Duration::from_millis(50),
            on_error: OnError::Allow,
        }
    }

    /// Whether the client accepts `url` (checked without connecting).
    pub fn check_url(url: &str) -> Result<(), String> {
        redis::Client::open(url)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}
