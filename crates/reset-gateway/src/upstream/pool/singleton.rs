//! The HTTP/2 connection every request of a worker shares, and the one connect the others
//! wait for until it is known whether the upstream speaks HTTP/2 (see the pool's notes).

use std::pin::Pin;
use std::sync::Arc;

use hyper::client::conn::http2;
use tokio::sync::futures::Notified;

use super::connect::Fresh;
use super::send_error::SendError;
use super::{lock, PoolState};
use crate::upstream::UpstreamBody;

/// The HTTP/2 side of a pool: its connection, what the last connect found the upstream
/// to speak, and the connect under way.
pub(super) struct H2 {
    /// The HTTP/2 connection, when the upstream chose HTTP/2, and its number.
    sender: Option<(u64, http2::SendRequest<UpstreamBody>)>,
    /// How many HTTP/2 connections were made.
    made: u64,
    /// The last connect negotiated HTTP/1.1 (or the origin is `http://`): each request
    /// without an idle connection connects on its own.
    http1: bool,
    /// A request is connecting, and those without a connection wait for it.
    connecting: bool,
    /// The number of the latest connect waited for.
    attempt: u64,
    /// The latest such connect that failed, by number, for the requests that waited on it.
    failed: Option<(u64, Arc<SendError>)>,
}

impl H2 {
    /// No HTTP/2 connection yet; `http1` when the upstream is known to speak HTTP/1.1 only.
    pub(super) fn new(http1: bool) -> Self {
        H2 {
            sender: None,
            made: 0,
            http1,
            connecting: false,
            attempt: 0,
            failed: None,
        }
    }
}

/// What a request without an idle HTTP/1.1 connection does.
pub(super) enum Turn<'a> {
    /// Sends on the HTTP/2 connection numbered so.
    Use(u64, http2::SendRequest<UpstreamBody>),
    /// Waits for the connect numbered so that another request is making.
    Wait(Pin<Box<Notified<'a>>>, u64),
    /// Connects, for itself alone or (with a guard) for those that will wait on it.
    Connect(Option<Connecting<'a>>),
}

/// The connect that other requests wait for. Dropped, it wakes them: when the connect ended
/// (they find its connection or its failure) or when the request making it was dropped
/// before (one of them connects instead).
pub(super) struct Connecting<'a> {
    pool: &'a PoolState,
    pub(super) attempt: u64,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        lock(&self.pool.h2).connecting = false;
        self.pool.connected.notify_waiters();
    }
}

impl PoolState {
    /// The HTTP/2 connection if there is one; else whether to wait for the connect under
    /// way or to make one, for others to wait on unless the upstream speaks HTTP/1.1.
    pub(super) fn turn(&self) -> Turn<'_> {
        let mut h2 = lock(&self.h2);
        if let Some((number, sender)) = &h2.sender {
            if !sender.is_closed() {
                return Turn::Use(*number, sender.clone());
            }
            h2.sender = None;
        }
        if h2.http1 {
            return Turn::Connect(None);
        }
        if h2.connecting {
            // Made under the lock, so the wake-up that ends the connect cannot come before it.
            return Turn::Wait(Box::pin(self.connected.notified()), h2.attempt);
        }
        h2.connecting = true;
        h2.attempt += 1;
        Turn::Connect(Some(Connecting {
            pool: self,
            attempt: h2.attempt,
        }))
    }

    /// What a connect brought: an HTTP/2 connection kept for every request, the knowledge
    /// that the upstream speaks HTTP/1.1, or (for connect `attempt`, which others waited
    /// on) a failure they share.
    pub(super) fn record(
        &self,
        fresh: Result<Fresh, SendError>,
        attempt: Option<u64>,
    ) -> Result<Fresh, SendError> {
        let mut h2 = lock(&self.h2);
        match fresh {
            Ok(Fresh::H2(sender)) => {
                h2.made += 1;
                h2.sender = Some((h2.made, sender.clone()));
                h2.http1 = false;
                Ok(Fresh::H2(sender))
            }
            Ok(Fresh::H1(sender)) => {
                h2.http1 = true;
                Ok(Fresh::H1(sender))
            }
            Err(error) => match attempt {
                Some(attempt) => {
                    let error = Arc::new(error);
                    h2.failed = Some((attempt, error.clone()));
                    Err(SendError::Shared(error))
                }
                None => Err(error),
            },
        }
    }

    /// Drops HTTP/2 connection `number`, which failed a request, unless already replaced.
    pub(super) fn forget_h2(&self, number: u64) {
        let mut h2 = lock(&self.h2);
        if h2
            .sender
            .as_ref()
            .is_some_and(|(current, _)| *current == number)
        {
            h2.sender = None;
        }
    }

    /// The failure of connect `attempt`, if it failed.
    pub(super) fn failed(&self, attempt: u64) -> Option<Arc<SendError>> {
        match &lock(&self.h2).failed {
            Some((failed, error)) if *failed == attempt => Some(error.clone()),
            _ => None,
        }
    }
}
