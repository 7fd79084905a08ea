//! The command line: `run` (the default), `check-config`, `hash-token`, `health` and `demo`,
//! as README.md, "Run it for real", describes them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration and exit 0, or print the error and exit 64.
    CheckConfig,
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
