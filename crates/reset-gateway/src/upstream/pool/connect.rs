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
    /// Connects to the origin: the name lookup, TCP and TLS within `connect_timeout`
    /// together (a server that takes the connection and never answers the TLS handshake is
    /// a timeout too, as with nginx's `proxy_connect_timeout`).
    pub(super) async fn connect(&self) -> Result<Fresh, SendError> {
        let connecting = self.connector.clone().oneshot(self.origin.clone());
        let io = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(connected) => connected.map_err(SendError::Connect)?,
            Err(_) => {
                let late = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "not connected within upstream.connect_timeout (name lookup, TCP and TLS)",
                );
                return Err(SendError::Connect(late.into()));
            }
        };
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // What one stream reads ahead of a client taking its answer, as over
                // HTTP/1.1 (hyper: 2 MiB, and 5 MiB for the connection): clients that read
                // nothing used up the shared connection's window, and every other request
                // on it, resets included, waited out upstream.timeout. The connection's
                // window has room for every stream QuickBlox allows to be that far ahead.
                .initial_stream_window_size(64 * 1024)
                .initial_connection_window_size(16 * 1024 * 1024)
                .handshake(io)
                .await
                .map_err(SendError::Exchange)?;
            run_connection(connection, "HTTP/2");
            return Ok(Fresh::H2(sender));
        }
        let (sender, connection) = http1::Builder::new()
            // What one connection reads ahead of a client taking an answer: hyper's
            // ~400 KiB, on each of the connections a client's streams hold, was memory a
            // client that reads nothing could pin. An answer's head must fit (QuickBlox's
            // are a few hundred bytes; nginx allows 4-8 KiB by default).
            .max_buf_size(16 * 1024)
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
