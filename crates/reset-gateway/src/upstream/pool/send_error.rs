//! How an exchange with QuickBlox fails, and when a request that failed on a kept
//! connection may go again on a new one.

use std::error::Error as StdError;
use std::sync::Arc;

use http::Request;
use hyper::client::conn::TrySendError;

use crate::upstream::UpstreamBody;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why an exchange failed before an answer arrived.
#[derive(Debug)]
pub enum SendError {
    /// No connection: refused, timed out, TLS.
    Connect(BoxError),
    /// The connection failed while the request was on it.
    Exchange(hyper::Error),
    /// The connect that this request and others waited for failed so.
    Shared(Arc<SendError>),
}

impl SendError {
    /// The failure and its causes, innermost last.
    pub fn chain(&self) -> impl Iterator<Item = &(dyn StdError + 'static)> {
        let first: &(dyn StdError + 'static) = match self {
            SendError::Connect(error) => error.as_ref(),
            SendError::Exchange(error) => error,
            SendError::Shared(error) => return error.chain(),
        };
        std::iter::successors(Some(first), |&e| e.source())
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(error) => write!(f, "connect: {error}"),
            SendError::Exchange(error) => write!(f, "exchange: {error}"),
            SendError::Shared(error) => error.fmt(f),
        }
    }
}

/// The request to send on a new connection after a kept one failed it: the request itself
/// if the connection never took it, or one `replay` builds again if the connection failed
/// the way a close it raced with looks; else the failure.
pub(super) fn again(
    mut error: TrySendError<Request<UpstreamBody>>,
    replay: Option<&(dyn Fn() -> Request<UpstreamBody> + Sync)>,
) -> Result<Request<UpstreamBody>, SendError> {
    match (error.take_message(), replay) {
        (Some(unsent), _) => Ok(unsent),
        (None, Some(replay)) if closed_under(error.error()) => Ok(replay()),
        (None, _) => Err(SendError::Exchange(error.into_error())),
    }
}

/// A kept connection that the other side closed as the request went out: no answer at
/// all, or the connection reset, broken or ended (TLS without its close) under the write.
fn closed_under(error: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    error.is_incomplete_message()
        || std::iter::successors(error.source(), |&e| e.source()).any(|cause| {
            cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
                )
            })
        })
}
