//! `reset-gateway simulate`: replays a recorded access log through the limits of a
//! proposed configuration (and, with `--compare`, the current one) and reports per quota
//! what it would have done. `reader` reads the log, `replay` decides each request again
//! with the gateway's own limiter, `report` prints the result.

pub(crate) mod access_line;
mod distinct;
pub mod reader;
pub mod replay;
pub mod report;
mod summary;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use reset_guard::{ConfigError, GuardSettings, TokenDigest};

use crate::config::GatewayConfig;
use reader::Reader;
use replay::Simulation;

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// A configuration file is missing or invalid.
    #[error("invalid configuration: {}: {error}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        error: ConfigError,
    },
    /// The log cannot be opened or read.
    #[error("cannot read the log {name}: {error}")]
    Log {
        /// The file, or standard input.
        name: String,
        /// Why.
        error: std::io::Error,
    },
}

/// The limits of a configuration file and its `store.max_keys`. Only `guard` and `store`
/// are checked: a replay needs no API key, secret or listener.
pub fn limits_of(path: &Path) -> Result<(GuardSettings, usize), SimulateError> {
    let (config, yaml) = config_of(path)?;
    limits_in(path, &config, &yaml)
}

/// [`limits_of`] the configuration read from `path` as `yaml`.
fn limits_in(
    path: &Path,
    config: &GatewayConfig,
    yaml: &str,
) -> Result<(GuardSettings, usize), SimulateError> {
    let config_error = |error| SimulateError::Config {
        path: path.to_owned(),
        error,
    };
    let mut guard = config.guard.clone();
    // A replay sends nothing and checks no token: the shipped files' placeholder client
    // (which the gateway refuses to run with) is taken as a client like another.
    for (i, client) in guard.clients.iter_mut().enumerate() {
        if client.token_sha256.placeholder().is_some() {
            client.token_sha256 = TokenDigest::of(format!("replayed placeholder {i}").as_bytes());
        }
    }
    let guard = guard
        .validate()
        .map_err(|e| config_error(e.within("guard").located(yaml)))?;
    if config.store.max_keys == 0 {
        let error = ConfigError::new("store.max_keys", "must be at least 1").located(yaml);
        return Err(config_error(error));
    }
    Ok((guard, config.store.max_keys))
}

/// The limits of the file at `path` in words (`check-config --explain`), read as a replay
/// reads them: without the secrets, which a proposal checked on a workstation lacks.
pub fn explained(path: &Path) -> Result<String, SimulateError> {
    let (config, yaml) = config_of(path)?;
    let (guard, _) = limits_in(path, &config, &yaml)?;
    // The spread only where the file's own checks would take it (else the error says why).
    let redis = &config.store.redis;
    let spread = config.store.kind == crate::config::StoreKind::Redis
        && redis.check_global_keys().is_ok()
        && crate::config::global_bursts_fit(&guard, redis.global_keys, "").is_ok();
    let global_keys = if spread { redis.global_keys } else { 1 };
    Ok(crate::explain::explain(&guard, global_keys))
}

fn config_of(path: &Path) -> Result<(GatewayConfig, String), SimulateError> {
    let config_error = |error| SimulateError::Config {
        path: path.to_owned(),
        error,
    };
    let yaml = std::fs::read_to_string(path).map_err(|e| {
        config_error(ConfigError::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        ))
    })?;
    let config = GatewayConfig::from_yaml(&yaml).map_err(config_error)?;
    Ok((config, yaml))
}

/// The settings a replay takes from the log as the recording applied them, each as its
/// key and its value written out: who a request's client IP, client and address key were
/// is read from the access line, not worked out again, so a proposal that changes one of
/// these is not replayed as it would run.
fn unreplayed(config: &GatewayConfig) -> Vec<(&'static str, String)> {
    let guard = &config.guard;
    // Lists compared as sets: the order they are written in changes nothing.
    let sorted = |mut items: Vec<String>| {
        items.sort();
        format!("{items:?}")
    };
    vec![
        ("guard.path", guard.path.clone()),
        (
            "guard.client_ip.trusted_proxies",
            sorted(
                guard
                    .client_ip
                    .trusted_proxies
                    .iter()
                    .map(|net| format!("{net:?}"))
                    .collect(),
            ),
        ),
        (
            "server.proxy_protocol",
            format!("{:?}", config.server.proxy_protocol),
        ),
        (
            "guard.clients",
            sorted(
                guard
                    .clients
                    .iter()
                    .map(|c| format!("{} {}", c.id, c.token_sha256.to_hex()))
                    .collect(),
            ),
        ),
        (
            "guard.limits.email_key",
            format!("{:?}", guard.limits.email_key),
        ),
        (
            "guard.email.allow_utf8_local",
            guard.email.allow_utf8_local.to_string(),
        ),
    ]
}

/// The keys of [`unreplayed`] settings that `current` and `proposed` set differently.
fn unreplayed_changes(proposed: &Path, current: &Path) -> Result<Vec<&'static str>, SimulateError> {
    let (proposed, current) = (
        unreplayed(&config_of(proposed)?.0),
        unreplayed(&config_of(current)?.0),
    );
    Ok(proposed
        .iter()
        .zip(&current)
        .filter(|(p, c)| p.1 != c.1)
        .map(|(p, _)| p.0)
        .collect())
}

/// Reads `log` to the end and replays it.
pub fn simulate(
    log: impl BufRead,
    log_name: &str,
    simulation: &mut Simulation,
    reader: &mut Reader,
) -> Result<(), SimulateError> {
    reader
        .read_all(log, |request, clients| simulation.push(request, clients))
        .map_err(|error| SimulateError::Log {
            name: log_name.to_owned(),
            error,
        })?;
    simulation.finish();
    Ok(())
}

/// Exit status when the log cannot be read (EX_NOINPUT).
pub const EXIT_NO_INPUT: u8 = 66;

/// The command: replays `log` (standard input when `None`) through `proposed`, and
/// `current` beside it; prints the table or, with `json`, one JSON object.
pub fn main(proposed: &Path, log: Option<&Path>, current: Option<&Path>, json: bool) -> ExitCode {
    match run(proposed, log, current, json) {
        // A report that could not be written (a full disk, a closed pipe) is no success: a
        // script keeping `--json` would be left an empty file.
        Ok(report) => match crate::console::out(format_args!("{report}")) {
            true => ExitCode::SUCCESS,
            false => {
                crate::console::err(format_args!(
                    "the report could not be written to standard output"
                ));
                ExitCode::FAILURE
            }
        },
        Err(error @ SimulateError::Config { .. }) => {
            crate::console::err(format_args!("{error}"));
            ExitCode::from(crate::EXIT_CONFIG)
        }
        Err(error @ SimulateError::Log { .. }) => {
            crate::console::err(format_args!("{error}"));
            ExitCode::from(EXIT_NO_INPUT)
        }
    }
}

/// [`main`] without printing: the report's text.
pub fn run(
    proposed: &Path,
    log: Option<&Path>,
    current: Option<&Path>,
    json: bool,
) -> Result<String, SimulateError> {
    let mut simulation = Simulation::new(limits_of(proposed)?, current.map(limits_of).transpose()?);
    if let Some(current) = current {
        simulation.unreplayed = unreplayed_changes(proposed, current)?;
    }
    let mut reader = Reader::default();
    let name = log.map_or_else(|| "standard input".to_owned(), |p| p.display().to_string());
    match log {
        Some(path) => {
            let file = std::fs::File::open(path).map_err(|error| SimulateError::Log {
                name: name.clone(),
                error,
            })?;
            simulate(
                BufReader::with_capacity(1 << 16, file),
                &name,
                &mut simulation,
                &mut reader,
            )?;
        }
        None => simulate(std::io::stdin().lock(), &name, &mut simulation, &mut reader)?,
    }
    Ok(if json {
        let mut text = report::json(&simulation, &reader).to_string();
        text.push('\n');
        text
    } else {
        let names = (
            proposed.to_str().unwrap_or("proposed"),
            current.and_then(Path::to_str),
        );
        report::human(&simulation, &reader, names)
    })
}

#[cfg(test)]
mod tests;
