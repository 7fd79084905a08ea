//! The command line: `run` (the default), `check-config`, `simulate`, `hash-token`,
//! `health` and `demo`, as README.md, "Run it for real" and "Tuning limits", describes them.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

/// Edge gateway for the QuickBlox password-reset endpoint: checks each request, limits
/// abuse and swaps the client token for the server-held API key.
#[derive(Debug, Parser)]
#[command(name = "reset-gateway", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "RESET_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// What to do; without one, run the gateway.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The command line's grammar, where the commands that read no configuration
    /// (`hash-token`, `demo`) do not offer the global `--config` in their help: each has
    /// a hidden one of its own, which `parse_checked` refuses when written.
    pub fn command_checked() -> clap::Command {
        let mut command = Cli::command();
        for name in ["hash-token", "demo"] {
            if command.find_subcommand(name).is_some() {
                command = command.mut_subcommand(name, |sub| {
                    sub.arg(
                        clap::Arg::new("config")
                            .long("config")
                            .hide(true)
                            .value_parser(clap::value_parser!(PathBuf)),
                    )
                });
            }
        }
        command
    }

    /// The command line, or an exit with clap's message: also for `--config` written with a
    /// command that reads no configuration (`hash-token`, `demo`, which runs its own), which
    /// would otherwise be ignored without a word.
    pub fn parse_checked() -> Cli {
        let matches = Cli::command_checked().get_matches();
        let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
        let written =
            matches.value_source("config") == Some(clap::parser::ValueSource::CommandLine);
        let reads_none = match &cli.command {
            Some(Command::HashToken) => Some("hash-token"),
            #[cfg(feature = "demo")]
            Some(Command::Demo { .. }) => Some("demo"),
            _ => None,
        };
        if let (true, Some(name)) = (written, reads_none) {
            Cli::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("{name} reads no configuration file: leave out --config"),
                )
                .exit();
        }
        cli
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration and exit 0, or print the error and exit 64.
    CheckConfig {
        /// Also print each quota in plain words.
        #[arg(long)]
        explain: bool,
    },
    /// Replay a recorded JSON access log through the limits of `--config` (a proposal)
    /// and print, per quota, what it would have denied and how near it ran.
    Simulate {
        /// The access log (the gateway's JSON log; other lines are skipped). Standard
        /// input when absent.
        #[arg(long)]
        log: Option<PathBuf>,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Replay this configuration too (the current one) and list the requests whose
        /// fate changes.
        #[arg(long, value_name = "CURRENT")]
        compare: Option<PathBuf>,
    },
    /// Read a client token on stdin and print its SHA-256 for `guard.clients[].token_sha256`.
    HashToken,
    /// Ask the running gateway's admin listener (`admin.listen` of the configuration)
    /// whether it is ready: exit 0 if it is, 1 if not. For container health checks.
    Health,
    /// Run the gateway with an in-process QuickBlox stand-in and print curl commands to try.
    #[cfg(feature = "demo")]
    Demo {
        /// Where the demo gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
}
