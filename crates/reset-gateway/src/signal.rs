//! Process signals.
//!
//! Handlers are installed before the gateway binds or serves: until a handler is in place
//! a signal takes its default action, and for SIGHUP that is to end the process, so a
//! reload sent right after start (by a supervisor, or a test) would kill the gateway.
//! For `run`, SIGHUP is caught as soon as the command line is read (before the
//! configuration is read and the runtime exists) and, if one came that early, honoured once the reload
//! watch starts. A SIGTERM that early ends the process, which is what it asks.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};

/// How soon after the first stop signal another counts as the same request.
const SAME_REQUEST: Duration = Duration::from_secs(1);
/// How long a second stop signal waits for the requests in flight to be cut and logged.
const CUT_WAIT: Duration = Duration::from_secs(2);

/// A cue to the server: the drain's start, or the cut of what is still in flight.
pub type Cue = Pin<Box<dyn Future<Output = ()> + Send>>;

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
    /// (its cue to drain), and one that completes on a second (its cue to cut what is still
    /// in flight). The second ends it at once, with an error, once the cut requests are
    /// logged (at most two seconds): the operator who presses Ctrl-C again means it. One
    /// within a second of the first is the same request.
    pub async fn serve<F>(mut self, serve: impl FnOnce(Cue, Cue) -> F) -> anyhow::Result<()>
    where
        F: Future<Output = anyhow::Result<()>>,
    {
        let (first, drain) = tokio::sync::oneshot::channel::<()>();
        let (second, now) = tokio::sync::oneshot::channel::<()>();
        let cue = |received: tokio::sync::oneshot::Receiver<()>| -> Cue {
            Box::pin(async move {
                if received.await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
        };
        let serving = serve(cue(drain), cue(now));
        let mut serving = std::pin::pin!(serving);
        tokio::select! {
            result = &mut serving => result,
            (name, again) = async {
                let name = self.next().await;
                tracing::info!("{name} received");
                let _ = first.send(());
                let drain_began = Instant::now();
                loop {
                    let again = self.next().await;
                    // A process manager forwards the terminal's SIGINT (or sends SIGTERM)
                    // while the terminal sends its own: a signal that soon is the same
                    // request, not a second one.
                    if drain_began.elapsed() >= SAME_REQUEST {
                        tracing::warn!("{again} received after {name}: cutting the requests in flight");
                        break (name, again);
                    }
                    tracing::info!("{again} received within a second of {name}: the same request, still draining");
                }
            } => {
                // The requests in flight are cut and logged as such (their lines are the
                // record `simulate` replays); a server that takes longer is left.
                let _ = second.send(());
                let _ = tokio::time::timeout(CUT_WAIT, serving).await;
                anyhow::bail!("{again} after {name}: stopped without waiting for the requests in flight")
            }
        }
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// A SIGHUP caught before the runtime exists, remembered until [`hangups`] takes over.
pub struct EarlyHangup {
    id: signal_hook::SigId,
    seen: Arc<AtomicBool>,
}

/// Catches SIGHUP from now on, without a runtime; `None` if the handler cannot be set.
pub fn catch_hangup_early() -> Option<EarlyHangup> {
    let seen = Arc::new(AtomicBool::new(false));
    let id = signal_hook::flag::register(signal_hook::consts::SIGHUP, seen.clone()).ok()?;
    Some(EarlyHangup { id, seen })
}

/// SIGHUP, caught from now on: each one asks for a reload.
pub struct Hangups {
    signal: Signal,
    /// One came before this was made (and after [`catch_hangup_early`]).
    pending: bool,
}

/// Takes SIGHUP over from `early`, keeping one that came meanwhile.
pub fn hangups(early: Option<EarlyHangup>) -> std::io::Result<Hangups> {
    let signal = signal(SignalKind::hangup())?;
    let pending = early.is_some_and(|early| {
        signal_hook::low_level::unregister(early.id);
        early.seen.load(Ordering::Relaxed)
    });
    Ok(Hangups { signal, pending })
}

impl Hangups {
    /// The next SIGHUP (at once for one that came before the watch began).
    pub async fn recv(&mut self) {
        if std::mem::take(&mut self.pending) {
            return;
        }
        if self.signal.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}
