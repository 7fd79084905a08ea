//! `reset-gateway`: parse arguments, load the configuration, run.

use std::io::Read;
use std::process::ExitCode;

use reset_gateway::cli::{Cli, Command};
use reset_gateway::console::{err, out};
use reset_gateway::{health, load, signal, simulate, telemetry, EXIT_CONFIG};
use reset_guard::TokenDigest;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse_checked();
    // Before anything else the gateway does: until a handler is in place, a SIGHUP would
    // end the process (the other commands keep SIGHUP's usual meaning).
    let early_hangup = match cli.command {
        None | Some(Command::Run) => signal::catch_hangup_early(),
        _ => None,
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig { explain } => match load(&cli.config) {
            Ok(settings) => {
                let mut written = out(format_args!("configuration OK: {}\n", cli.config.display()));
                if explain {
                    let redis = settings.store.limits.redis.as_ref();
                    let global_keys = redis.map_or(1, |redis| redis.global_keys);
                    written &= out(format_args!(
                        "{}",
                        reset_gateway::explain::explain(&settings.guard, global_keys)
                    ));
                }
                exit_code(written)
            }
            Err(error) => {
                // The limits in words even so, where they are valid: a proposal read on a
                // workstation lacks the production secrets (the error still says so).
                if explain {
                    if let Ok(words) = simulate::explained(&cli.config) {
                        out(format_args!("{words}"));
                    }
                }
                invalid(&cli.config, &error)
            }
        },
        Command::Simulate { log, json, compare } => {
            simulate::main(&cli.config, log.as_deref(), compare.as_deref(), json)
        }
        Command::HashToken => hash_token(),
        Command::Health => match health::check(&cli.config) {
            Ok(answer) => exit_code(out(format_args!("ready: {answer}\n"))),
            Err(reason) => {
                err(format_args!("not ready: {reason}"));
                ExitCode::FAILURE
            }
        },
        #[cfg(feature = "demo")]
        Command::Demo { listen } => runtime(async move {
            let stop = signal::Terminate::install()?;
            stop.serve(|drain, now| reset_gateway::demo::run(listen, drain, now))
                .await
        }),
        Command::Run => {
            let settings = match load(&cli.config) {
                Ok(settings) => settings,
                Err(error) => return invalid(&cli.config, &error),
            };
            // Kept to the end: dropping it writes out the lines still queued.
            let _log_sink = telemetry::init(&settings.log);
            reset_gateway::fd_limit::raise_for(settings.server.max_connections);
            let path = cli.config.clone();
            runtime(async move {
                // Caught before the listeners open, so no signal meets its default action.
                let stop = signal::Terminate::install()?;
                let hangups = signal::hangups(early_hangup);
                let app = reset_gateway::build(settings).await?;
                tokio::spawn(app.reloader(path).watch(hangups));
                tracing::info!(listen = %app.local_addr(), admin = %app.admin_addr(), "serving");
                stop.serve(|drain, now| app.run_until(drain, now)).await
            })
        }
    }
}

fn invalid(path: &std::path::Path, error: &reset_guard::ConfigError) -> ExitCode {
    err(format_args!(
        "invalid configuration: {}: {error}",
        path.display()
    ));
    ExitCode::from(EXIT_CONFIG)
}

fn hash_token() -> ExitCode {
    let mut token = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut token) {
        err(format_args!("cannot read the token from stdin: {error}"));
        return ExitCode::FAILURE;
    }
    // As a header carries it: HTTP strips the spaces around a value, and `echo` adds a
    // newline.
    let token = token.trim_ascii();
    if token.is_empty() {
        err(format_args!(
            "no token on stdin: try `printf %s \"$TOKEN\" | reset-gateway hash-token`"
        ));
        return ExitCode::FAILURE;
    }
    if token.bytes().any(|b| b.is_ascii_control()) {
        err(format_args!(
            "the token holds a control character (a line break, say): no header can carry it"
        ));
        return ExitCode::FAILURE;
    }
    exit_code(out(format_args!(
        "{}\n",
        TokenDigest::of(token.as_bytes()).to_hex()
    )))
}

fn runtime(work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            err(format_args!("cannot start the runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            err(format_args!("reset-gateway: {error:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Success only if the command's output was written: a digest or verdict that never
/// reached its reader is a failure.
fn exit_code(written: bool) -> ExitCode {
    if written {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
