//! `qb-mock`: run the QuickBlox stand-in on its own.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use qb_mock::{Failure, MockConfig, MockServer};

/// A QuickBlox-compatible password-reset upstream for tests, demos and benchmarks.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Application API key accepted as `Authorization: ApiKey <key>`.
    #[arg(long, env = "QB_API_KEY", hide_env_values = true)]
    api_key: String,
    /// A registered address (repeat for more).
    #[arg(long = "user")]
    users: Vec<String>,
    /// Treat every address as a registered user (answer 200 to every valid reset).
    #[arg(long)]
    all_users: bool,
    /// A user session token accepted as `QB-Token` (repeat for more).
    #[arg(long = "session-token")]
    session_tokens: Vec<String>,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Answer every reset with this status instead.
    #[arg(long)]
    fail_status: Option<u16>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = MockConfig {
        api_key: args.api_key,
        session_tokens: args.session_tokens,
        users: args.users,
        all_users: args.all_users,
        latency: Duration::from_millis(args.latency_ms),
        failure: args.fail_status.map_or(Failure::None, Failure::Status),
    };
    let mock = MockServer::bind(args.listen, config, None)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("qb-mock listening on {}", mock.url());
    tokio::signal::ctrl_c().await?;
    mock.shutdown().await;
    Ok(())
}
