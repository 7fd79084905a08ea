//! Process signals.
//!
//! Handlers are installed before the gateway binds or serves: until a handler is in place
//! a signal takes its default action, and for SIGHUP that is to end the process, so a
//! reload sent right after start (by a supervisor, or a test) would kill the gateway.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The signals that stop the gateway, SIGTERM and SIGINT, caught from now on.
pub struct Terminate {
    term: Signal,
    int: Signal,
}

impl Terminate {
    /// Installs the handlers; needs a Tokio runtime with I/O enabled.
    pub fn install() -> std::io::Result<Self> {
        Ok(Terminate {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Completes on the first SIGTERM or SIGINT.
    pub async fn received(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// SIGHUP, caught from now on: each one asks for a reload.
pub fn hangups() -> std::io::Result<Signal> {
    signal(SignalKind::hangup())
}
