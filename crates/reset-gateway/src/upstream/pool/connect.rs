//! New connections to QuickBlox: TCP, TLS (ALPN picks HTTP/2 or HTTP/1.1), the HTTP
//! handshake, and the task that runs the connection's I/O.

use std::future::Future;

use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::ServiceExt;

use super::send_error::SendError;
use super::PoolState;
use crate::upstream::UpstreamBody;

/// A new connection, in the protocol the upstream chose.
pub(super) enum Fresh {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

impl PoolState {
    /// Connects to the origin.
    pub(super) async fn connect(&self) -> Result<Fresh, SendError> {
        let io = self
            .connector
            .clone()
            .oneshot(self.origin.clone())
            .await
            .map_err(SendError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(SendError::Exchange)?;
            run_connection(connection, "HTTP/2");
            return Ok(Fresh::H2(sender));
        }
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::Exchange)?;
        run_connection(connection, "HTTP/1.1");
        Ok(Fresh::H1(sender))
    }
}

/// Runs a connection's I/O on this worker's event loop until it ends.
fn run_connection(
    connection: impl Future<Output = hyper::Result<()>> + Send + 'static,
    protocol: &'static str,
) {
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, protocol, "upstream connection ended");
        }
    });
}
