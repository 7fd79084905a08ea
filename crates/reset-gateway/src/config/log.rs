//! `log` as written: the output format, the default level, whether request logs carry the
//! raw address, how repeated denials are logged and how many lines may wait for the sink.

use reset_guard::{ConfigDuration, ConfigError};
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
    /// Every denied request on its own line, or repeats folded into summary lines.
    pub denials: DenialLogging,
    /// How long repeats of one denial are folded into one summary line.
    pub denial_window: ConfigDuration,
    /// Lines that may wait for a slow log sink before new ones are dropped (and counted).
    pub queue_lines: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".to_owned(),
            include_email: false,
            denials: DenialLogging::Summarize,
            denial_window: ConfigDuration::from_secs(1),
            queue_lines: 8192,
        }
    }
}

impl LogConfig {
    /// Longest `denial_window`: a summary waits that long, so longer would delay the
    /// record of an attack past the point of being useful.
    pub const MAX_DENIAL_WINDOW: ConfigDuration = ConfigDuration::from_secs(60);

    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let window = self.denial_window;
        if window < ConfigDuration::from_millis(1) || window > Self::MAX_DENIAL_WINDOW {
            return Err(ConfigError::new("log.denial_window", "must be 1ms to 60s"));
        }
        if !(1..=1_000_000).contains(&self.queue_lines) {
            return Err(ConfigError::new("log.queue_lines", "must be 1 to 1000000"));
        }
        Ok(())
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

/// `log.denials`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenialLogging {
    /// One access line per denied request, however many.
    Full,
    /// The first few denials of one client/key in a window in full, the rest of that
    /// window as one summary line with their count.
    #[default]
    Summarize,
}
