//! One accepted connection: TLS or cleartext, then HTTP/1.1 or HTTP/2 (preface sniffing
//! in `preface.rs`, ALPN under TLS), served by hyper until it ends or the worker drains.

use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::handler::GatewayService;
use crate::config::ServerSettings;
use crate::preface;

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
            .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20));
        Protocols { http1, http2 }
    }
}

/// One accepted connection, before its protocol is known.
pub(super) struct Connection {
    pub(super) protocols: Protocols,
    pub(super) service: GatewayService,
    pub(super) head_timeout: Duration,
    pub(super) watcher: Watcher,
}

impl Connection {
    /// Cleartext: HTTP/2 if the client opens with the preface, else HTTP/1.1. A client
    /// that sends nothing, or part of the preface, is dropped after the header read
    /// timeout, so such connections cannot hold `max_connections` slots; waiting on them
    /// costs nothing but their memory.
    pub(super) async fn serve_plain(self, stream: TcpStream) {
        let peer = self.service.peer();
        match tokio::time::timeout(self.head_timeout, preface::read_protocol(stream)).await {
            Ok(Ok((preface::Protocol::Http2, io))) => self.serve_h2(io).await,
            Ok(Ok((preface::Protocol::Http1, io))) => self.serve_h1(io).await,
            Ok(Err(error)) => tracing::debug!(%peer, %error, "connection failed before a request"),
            Err(_) => tracing::debug!(%peer, "no request within the header read timeout"),
        }
    }

    /// TLS: the handshake must finish within the header read timeout; ALPN picks the protocol.
    pub(super) async fn serve_tls(self, acceptor: TlsAcceptor, stream: TcpStream) {
        let peer = self.service.peer();
        match tokio::time::timeout(self.head_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    self.serve_h2(tls).await
                } else {
                    self.serve_h1(tls).await
                }
            }
            Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    }

    async fn serve_h1<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self, io: I) {
        let peer = self.service.peer();
        let connection = self
            .protocols
            .http1
            .serve_connection(TokioIo::new(io), self.service);
        if let Err(error) = self.watcher.watch(connection).await {
            tracing::debug!(%peer, %error, "HTTP/1.1 connection ended with an error");
        }
    }

    async fn serve_h2<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self, io: I) {
        let peer = self.service.peer();
        let connection = self
            .protocols
            .http2
            .serve_connection(TokioIo::new(io), self.service);
        if let Err(error) = self.watcher.watch(connection).await {
            tracing::debug!(%peer, %error, "HTTP/2 connection ended with an error");
        }
    }
}
