//! How long a streamed body may send nothing: the client's on its way to QuickBlox, and
//! QuickBlox's answer on its way back.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A deadline `idle` after a body's last frame, armed only once the body first waits (a
/// body that never does costs no timer).
pub(super) struct IdleDeadline {
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleDeadline {
    pub(super) fn new(idle: Duration) -> Self {
        IdleDeadline { idle, sleep: None }
    }

    /// How long the body may send nothing.
    pub(super) fn idle(&self) -> Duration {
        self.idle
    }

    /// The body passed a frame on: the deadline moves to `idle` from now.
    pub(super) fn moved(&mut self) {
        if let Some(sleep) = &mut self.sleep {
            sleep.as_mut().reset(Instant::now() + self.idle);
        }
    }

    /// The body waits: ready once it has sent nothing for `idle`.
    pub(super) fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let idle = self.idle;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        sleep.as_mut().poll(cx)
    }
}
