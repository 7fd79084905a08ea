//! `log.denials: summarize`: the access log of denied requests, with repeats folded
//! (fold.rs decides) into summary lines.
//!
//! A summary line is an access line of the denial it stands for (the same `client_ip`,
//! `client_id`, `email_hash`, `outcome`, `limit`, `status`) without a request id or
//! durations, plus `count`: how many requests it stands for, `received_at`: when the first
//! of them arrived and `last_received_at`: when the last did. It is written when its
//! window closes: at the next denial of its identity, at the periodic sweep, or at
//! shutdown.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::fold::{Decision, Denial, Folder, Summary};
use crate::config::{DenialLogging, LogConfig};

/// The folding of denials for the whole process (every worker shares it).
#[derive(Debug)]
pub struct DenialLog {
    /// `None` under `log.denials: full`.
    folder: Option<Folder>,
    window: Duration,
}

impl DenialLog {
    pub fn new(log: &LogConfig) -> Self {
        let window = log.denial_window.0;
        DenialLog {
            folder: (log.denials == DenialLogging::Summarize).then(|| Folder::new(window)),
            window,
        }
    }

    /// Whether to write the access line of `denial`; writes the summary of a window it
    /// closes.
    pub fn admit(&self, denial: &Denial<'_>, received: SystemTime) -> bool {
        let Some(folder) = &self.folder else {
            return true;
        };
        let (decision, closed) = folder.observe(denial, epoch_ns(received));
        if let Some(summary) = closed {
            emit(&summary);
        }
        decision == Decision::Log
    }

    /// Writes the summaries of the windows that ended by `now`.
    pub fn sweep(&self, now: SystemTime) {
        if let Some(folder) = &self.folder {
            folder.sweep(epoch_ns(now)).iter().for_each(emit);
        }
    }

    /// Writes every pending summary (shutdown).
    pub fn drain(&self) {
        if let Some(folder) = &self.folder {
            folder.drain().iter().for_each(emit);
        }
    }

    /// Sweeps once a window (at most ten times a second), so that a summary waits at most
    /// about two windows even when its identity goes quiet.
    pub async fn sweep_periodically(self: Arc<Self>) {
        if self.folder.is_none() {
            return;
        }
        let mut ticks = tokio::time::interval(self.window.max(Duration::from_millis(100)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.sweep(SystemTime::now());
        }
    }
}

fn epoch_ns(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn time_of(ns: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
}

/// Writes one summary line.
fn emit(summary: &Summary) {
    let identity = &summary.identity;
    tracing::info!(
        target: "access",
        received_at = super::timestamp(time_of(summary.first_ns)),
        last_received_at = super::timestamp(time_of(summary.last_ns)),
        count = summary.count,
        guarded = identity.guarded.then_some(true),
        client_id = identity.client_id.as_deref(),
        client_ip = %identity.client_ip,
        email_hash = identity.email_hash.map(super::email_tag),
        outcome = identity.outcome,
        limit = identity.limit,
        status = identity.status,
    );
}
