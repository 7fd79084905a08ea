//! `reset-gateway`: parse arguments, load the configuration, run.

use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use reset_gateway::cli::{Cli, Command};
use reset_gateway::{health, load, signal, simulate, telemetry, EXIT_CONFIG};
use reset_guard::TokenDigest;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig { explain } => match load(&cli.config) {
            Ok(settings) => {
                println!("configuration OK: {}", cli.config.display());
                if explain {
                    print!("{}", reset_gateway::explain::explain(&settings.guard));
                }
                ExitCode::SUCCESS
            }
            Err(error) => invalid(&cli.config, &error),
        },
        Command::Simulate { log, json, compare } => {
            simulate::main(&cli.config, log.as_deref(), compare.as_deref(), json)
        }
        Command::HashToken => hash_token(),
        Command::Health => match health::check(&cli.config) {
            Ok(answer) => {
                println!("ready: {answer}");
                ExitCode::SUCCESS
            }
            Err(reason) => {
                eprintln!("not ready: {reason}");
                ExitCode::FAILURE
            }
        },
        #[cfg(feature = "demo")]
        Command::Demo { listen } => runtime(async move {
            let stop = signal::Terminate::install()?;
            reset_gateway::demo::run(listen, stop.received()).await
        }),
        Command::Run => {
            let settings = match load(&cli.config) {
                Ok(settings) => settings,
                Err(error) => return invalid(&cli.config, &error),
            };
            // Kept to the end: dropping it writes out the lines still queued.
            let _log_sink = telemetry::init(&settings.log);
            let path = cli.config.clone();
            runtime(async move {
                // Caught before the listeners open, so no signal meets its default action.
                let stop = signal::Terminate::install()?;
                let hangups = signal::hangups();
                let app = reset_gateway::build(settings).await?;
                tokio::spawn(app.reloader(path).watch(hangups));
                tracing::info!(listen = %app.local_addr(), admin = %app.admin_addr(), "serving");
                app.run(stop.received()).await
            })
        }
    }
}

fn invalid(path: &std::path::Path, error: &reset_guard::ConfigError) -> ExitCode {
    eprintln!("invalid configuration: {}: {error}", path.display());
    ExitCode::from(EXIT_CONFIG)
}

fn hash_token() -> ExitCode {
    let mut token = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut token) {
        eprintln!("cannot read the token from stdin: {error}");
        return ExitCode::FAILURE;
    }
    // As a header carries it: HTTP strips the spaces around a value, and `echo` adds a
    // newline.
    let token = token.trim_ascii();
    if token.is_empty() {
        eprintln!("no token on stdin: try `printf %s \"$TOKEN\" | reset-gateway hash-token`");
        return ExitCode::FAILURE;
    }
    if token.bytes().any(|b| b.is_ascii_control()) {
        eprintln!(
            "the token holds a control character (a line break, say): no header can carry it"
        );
        return ExitCode::FAILURE;
    }
    println!("{}", TokenDigest::of(token.as_bytes()).to_hex());
    ExitCode::SUCCESS
}

fn runtime(work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("reset-gateway: {error:#}");
            ExitCode::FAILURE
        }
    }
}
