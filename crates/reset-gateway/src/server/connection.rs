//! One accepted connection: its PROXY protocol header when configured (`proxy_protocol.rs`),
//! TLS or cleartext, then HTTP/1.1 or HTTP/2 (preface sniffing in `preface.rs`, ALPN under
//! TLS), served by hyper until it ends or the worker drains.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::TlsAcceptor;

use super::handler::{GatewayService, WorkerContext};
use super::idle::Activity;
use super::send_timeout::SendTimeout;
use crate::config::ServerSettings;
use crate::preface::{self, Rewind};
use crate::proxy_protocol::{self, Failure, ProxyProtocolSettings};

/// Streams one HTTP/2 connection may have open at once.
pub(super) const MAX_CONCURRENT_STREAMS: u32 = 32;

/// Bytes of an answer each HTTP/2 stream may buffer beyond what the client has taken, on
/// top of the socket's own buffer: a frame's worth, enough to keep a reading client's
/// socket fed.
const MAX_SEND_BUFFER: usize = 16 * 1024;

/// Streams of one HTTP/2 connection the gateway may reset before it closes the connection.
/// h2 counts the streams it refuses for going over [`MAX_CONCURRENT_STREAMS`] too: a client
/// may open many before the gateway's SETTINGS reach it (hyper's client opens up to 100),
/// so this is well above that burst.
const MAX_LOCAL_RESETS: usize = 256;

/// How long the steps before HTTP (PROXY header, TLS handshake, preface) may take before
/// an HTTP/1.1 connection's first request head is held to what is left of the deadline:
/// hyper's own header read timer starts afresh when it begins reading, so a client slow
/// through those steps and then through its head would get up to twice the timeout. A
/// cleartext connection whose request came with it costs nothing more; one later (a TLS
/// handshake from afar takes a round trip or two) costs a timer and a flag set by its
/// requests.
const BEFORE_HTTP_SLACK: Duration = Duration::from_millis(20);

/// The HTTP/1.1 and HTTP/2 server settings.
#[derive(Clone)]
pub(super) struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Protocols {
    pub(super) fn new(server: &ServerSettings) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // Also closes keep-alive connections idle for that long between requests.
            .header_read_timeout(server.header_read_timeout)
            .max_buf_size(server.max_header_bytes)
            // A client that shuts down its sending side after the request still gets the answer.
            .half_close(true)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            // nginx's default is 128, hyper's 200: each open stream of a forwarded route
            // can hold an upstream exchange for server.request_timeout.
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
            // What each stream may hold of an answer the client has not taken yet. hyper's
            // 400 KiB let a client that grants a huge window and then reads nothing pin
            // 32 streams' worth of forwarded answers: about 40 MB a connection, with the
            // upstream connections' read-ahead (benches/README.md has the figures).
            .max_send_buf_size(MAX_SEND_BUFFER)
            // Streams the gateway itself resets for a protocol error (a body longer than
            // its content-length): each such body over 64 KiB has reached QuickBlox and
            // costs an upstream connection, so a connection gets fewer than hyper's 1,024.
            .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20));
        Protocols { http1, http2 }
    }
}

/// One accepted connection, before its protocol is known.
pub(super) struct Connection {
    pub(super) protocols: Protocols,
    pub(super) context: Arc<WorkerContext>,
    /// The TCP peer.
    pub(super) peer: SocketAddr,
    pub(super) head_timeout: Duration,
    /// Keeps the worker's drain waiting until the connection ends.
    pub(super) watcher: Watcher,
    /// Set when the worker drains.
    pub(super) stop: tokio::sync::watch::Receiver<bool>,
}

impl Connection {
    /// Serves the connection: its PROXY protocol header first when `proxy` is set, then
    /// TLS when `tls` is, then HTTP. Everything before the first request (header, TLS
    /// handshake, HTTP/2 preface) shares one deadline, `server.header_read_timeout`.
    pub(super) async fn serve(
        self,
        mut stream: TcpStream,
        tls: Option<TlsAcceptor>,
        proxy: Option<Arc<ProxyProtocolSettings>>,
    ) {
        let deadline = Instant::now() + self.head_timeout;
        let peer = self.peer;
        let Some(proxy) = proxy else {
            return match tls {
                Some(acceptor) => self.serve_tls(acceptor, stream, peer, deadline).await,
                None => self.serve_plain(stream, None, peer, deadline).await,
            };
        };
        let (client, read) = match proxy_protocol::read_client(&mut stream, peer, &proxy, deadline)
            .await
        {
            Ok(found) => found,
            Err(Failure::Refused(refused)) => {
                self.context.state.metrics.proxy_refused(refused);
                let reason = refused.reason();
                tracing::debug!(%peer, reason, "connection refused for its PROXY protocol header");
                return;
            }
            Err(Failure::Io(error)) => {
                tracing::debug!(%peer, %error, "connection failed before a request");
                return;
            }
        };
        match tls {
            Some(acceptor) => {
                let stream = Rewind::new(read, stream);
                self.serve_tls(acceptor, stream, client, deadline).await
            }
            None => self.serve_plain(stream, Some(read), client, deadline).await,
        }
    }

    /// Cleartext: HTTP/2 if the client opens with the preface, else HTTP/1.1. `read` is
    /// what was read already (after a PROXY protocol header). A client that sends
    /// nothing, or part of the preface, is dropped at the deadline, so such connections
    /// cannot hold `max_connections` slots; waiting on them costs nothing but their memory.
    async fn serve_plain(
        self,
        stream: TcpStream,
        read: Option<BytesMut>,
        client: SocketAddr,
        deadline: Instant,
    ) {
        let sniffed = match read {
            Some(read) => timeout_at(deadline, preface::read_protocol_after(stream, read)).await,
            None => timeout_at(deadline, preface::read_protocol(stream)).await,
        };
        match sniffed {
            Ok(Ok((preface::Protocol::Http2, io))) => self.serve_h2(io, client, deadline).await,
            Ok(Ok((preface::Protocol::Http1, io))) => self.serve_h1(io, client, deadline).await,
            Ok(Err(error)) => {
                tracing::debug!(peer = %client, %error, "connection failed before a request")
            }
            Err(_) => tracing::debug!(peer = %client, "no request within the header read timeout"),
        }
    }

    /// TLS: the handshake must finish by the deadline; ALPN picks the protocol.
    async fn serve_tls<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self,
        acceptor: TlsAcceptor,
        stream: I,
        client: SocketAddr,
        deadline: Instant,
    ) {
        match timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    self.serve_h2(tls, client, deadline).await
                } else {
                    self.serve_h1(tls, client, deadline).await
                }
            }
            Ok(Err(error)) => tracing::debug!(peer = %client, %error, "TLS handshake failed"),
            Err(_) => tracing::debug!(peer = %client, "TLS handshake timed out"),
        }
    }

    /// HTTP/1.1, every request attributed to `client`; the first request's head must have
    /// come by `deadline` (set at accept).
    async fn serve_h1<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self,
        io: I,
        client: SocketAddr,
        deadline: Instant,
    ) {
        let io = SendTimeout::new(io, self.context.request_timeout);
        let late = deadline + BEFORE_HTTP_SLACK < Instant::now() + self.head_timeout;
        let first_request = late.then(|| Arc::new(AtomicBool::new(false)));
        let mut service = GatewayService::new(self.context, client);
        if let Some(began) = &first_request {
            service = service.noting_the_first_request(began.clone());
        }
        let connection = self
            .protocols
            .http1
            .serve_connection(TokioIo::new(io), service);
        let connection = self.watcher.watch(connection);
        let Some(began) = first_request else {
            if let Err(error) = connection.await {
                tracing::debug!(peer = %client, %error, "HTTP/1.1 connection ended with an error");
            }
            return;
        };
        let no_head_in_time = async {
            tokio::time::sleep_until(deadline).await;
            if began.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            result = connection => if let Err(error) = result {
                tracing::debug!(peer = %client, %error, "HTTP/1.1 connection ended with an error");
            },
            () = no_head_in_time => {
                tracing::debug!(peer = %client, "no request within the header read timeout");
            }
        }
    }

    /// HTTP/2, every request attributed to `client`; closed gracefully (GOAWAY) when the
    /// worker drains or the connection has been idle for the header read timeout, dropped
    /// when the client has taken nothing of an answer for the request timeout (idle.rs).
    async fn serve_h2<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        mut self,
        io: I,
        client: SocketAddr,
        deadline: Instant,
    ) {
        let send_timeout = self.context.request_timeout;
        let io = SendTimeout::new(io, send_timeout);
        // Idle from the accept: a connection that took its time over the steps before
        // HTTP/2 has had that much of its header read timeout.
        let accepted = deadline.checked_sub(self.head_timeout).unwrap_or(deadline);
        let activity = std::sync::Arc::new(Activity::since(accepted));
        let service = GatewayService::new(self.context, client).counting(activity.clone());
        let connection = self
            .protocols
            .http2
            .serve_connection(TokioIo::new(io), service);
        let mut connection = std::pin::pin!(connection);
        let mut closing = false;
        // An idle connection's GOAWAY waits for the client to acknowledge a ping: one that
        // never does is dropped once a header read timeout has passed since it and no
        // request has been open for as long (one that raced the GOAWAY is served; hyper's
        // own keep-alive would wait 40 s).
        let mut idle_closed_by = None;
        let result = loop {
            let idle_close_overdue = async {
                match idle_closed_by {
                    Some(deadline) => {
                        tokio::time::sleep_until(deadline).await;
                        activity.idle_for(self.head_timeout).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = connection.as_mut() => break result,
                _ = self.stop.wait_for(|stop| *stop), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = activity.idle_for(self.head_timeout), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                    idle_closed_by = Some(Instant::now() + self.head_timeout);
                }
                () = idle_close_overdue => break Ok(()),
                () = activity.client_stalled_for(send_timeout) => {
                    tracing::debug!(
                        peer = %client,
                        "HTTP/2 client took nothing of an answer within server.request_timeout; connection dropped"
                    );
                    break Ok(());
                }
            }
        };
        drop(self.watcher);
        if let Err(error) = result {
            tracing::debug!(peer = %client, %error, "HTTP/2 connection ended with an error");
        }
    }
}
