//! `log` as written: the output format, the default level and whether request logs carry the
//! raw address. It needs no checking, so the gateway runs on it as it is.

use serde::Deserialize;

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
