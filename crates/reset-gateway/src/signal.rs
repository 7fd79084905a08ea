//! Process signals.
//!
//! Handlers are installed before the gateway binds or serves: until a handler is in place
//! a signal takes its default action, and for SIGHUP that is to end the process, so a
//! reload sent right after start (by a supervisor, or a test) would kill the gateway.

use std::future::Future;
use std::pin::Pin;

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

    /// Runs `serve`, handing it a future that completes on the first SIGTERM or SIGINT
    /// (its cue to drain). A second signal while it drains ends it at once: the operator
    /// who presses Ctrl-C twice means it.
    pub async fn serve<F>(
        mut self,
        serve: impl FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
    ) -> anyhow::Result<()>
    where
        F: Future<Output = anyhow::Result<()>>,
    {
        let (first, drain) = tokio::sync::oneshot::channel::<()>();
        let serving = serve(Box::pin(async move {
            let _ = drain.await;
        }));
        tokio::select! {
            result = serving => result,
            name = async {
                let name = self.next().await;
                tracing::info!("{name} received");
                let _ = first.send(());
                let name = self.next().await;
                tracing::warn!("{name} received again: stopping without waiting for the requests in flight");
                name
            } => anyhow::bail!("{name} received twice: stopped without waiting for the requests in flight"),
        }
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// SIGHUP, caught from now on: each one asks for a reload.
pub fn hangups() -> std::io::Result<Signal> {
    signal(SignalKind::hangup())
}
