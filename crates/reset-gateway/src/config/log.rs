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
        check_level(&self.level).map_err(|why| ConfigError::new("log.level", why))?;
        // It overrides log.level, read the same way: a bare word that is not a level would
        // turn every message off, errors and refused reloads included.
        if let Some(level) = env_level() {
            check_level(&level).map_err(|why| {
                ConfigError::new(
                    "RUST_LOG",
                    format!("{why} (set in the environment, it overrides log.level)"),
                )
            })?;
        }
        Ok(())
    }
}

/// `RUST_LOG`, where it is set to something: it overrides `log.level`.
pub(crate) fn env_level() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|level| !level.trim().is_empty())
}

/// Level names a filter directive may be.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Whether `level` is a filter the gateway logs by: a level, or comma-separated
/// `target=level` directives (`warn,reset_guard=debug`). A bare word that is not a level
/// would be read as a target to log at every level, leaving every other line, the access
/// log included, unlogged.
fn check_level(level: &str) -> Result<(), String> {
    if level.trim().is_empty() {
        return Err("must not be empty: one of trace, debug, info, warn, error, off".to_owned());
    }
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains('=') && !directive.contains(['[', '{', ':']);
        if bare && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a level: one of trace, debug, info, warn, error, off, \
                 or target=level directives separated by commas"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| format!("is not a log filter: {e}"))
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

#[cfg(test)]
mod tests {
    use super::check_level;

    #[test]
    fn a_level_is_a_level_or_target_directives() {
        for good in [
            "info",
            "WARN",
            "off",
            "warn,reset_guard=debug",
            "reset_guard::limit",
            "info,",
        ] {
            assert_eq!(check_level(good), Ok(()), "{good}");
        }
        for bad in ["verbose", "", "  ", "warn,loud", "info,x=nonsense"] {
            assert!(check_level(bad).is_err(), "{bad}");
        }
    }
}
