//! One worker thread's accept loop: connections up to its share of `max_connections`,
//! each served on the worker's own event loop, drained on shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::connection::{Connection, Protocols};
use super::handler::WorkerContext;
use crate::accept::accept;
use crate::proxy_protocol::ProxyProtocolSettings;

/// Least time between two warnings that a worker's connections are all taken.
const LIMIT_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// One worker: its listener, its event loop, its connections.
pub(super) struct Worker {
    pub(super) listener: std::net::TcpListener,
    pub(super) context: Arc<WorkerContext>,
    pub(super) protocols: Protocols,
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) proxy: Option<Arc<ProxyProtocolSettings>>,
    pub(super) head_timeout: Duration,
    pub(super) grace: Duration,
    pub(super) max_connections: usize,
    pub(super) stop: tokio::sync::watch::Receiver<bool>,
    /// Set when the requests still in flight during the drain are to be cut now.
    pub(super) cut: tokio::sync::watch::Receiver<bool>,
}

impl Worker {
    pub(super) async fn run(self) -> anyhow::Result<()> {
        let listener = TcpListener::from_std(self.listener)?;
        let connections = Arc::new(Semaphore::new(self.max_connections));
        let graceful = GracefulShutdown::new();
        let mut draining = self.stop.clone();
        let stop = async {
            let _ = draining.wait_for(|stop| *stop).await;
        };
        let mut stop = std::pin::pin!(stop);
        let metrics = &self.context.state.metrics;
        let mut limit_warned: Option<tokio::time::Instant> = None;
        loop {
            // Beyond max_connections, new connections wait in the kernel's backlog rather
            // than being accepted and starving the ones being served: counted, and said at
            // most once a minute (the wait shows nowhere else: not in request durations).
            let permit = match connections.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    metrics.connection_limit_reached();
                    if limit_warned.is_none_or(|at| at.elapsed() >= LIMIT_WARNING_INTERVAL) {
                        limit_warned = Some(tokio::time::Instant::now());
                        tracing::warn!(
                            max_connections = self.max_connections,
                            "server.max_connections (this worker's share) all open: new connections wait in the listen backlog"
                        );
                    }
                    tokio::select! {
                        permit = connections.clone().acquire_owned() => permit.expect("never closed"),
                        () = &mut stop => break,
                    }
                }
            };
            let (stream, peer) = tokio::select! {
                accepted = accept(&listener) => accepted,
                () = &mut stop => break,
            };
            let _ = stream.set_nodelay(true);
            let connection = Connection {
                protocols: self.protocols.clone(),
                context: self.context.clone(),
                peer,
                head_timeout: self.head_timeout,
                watcher: graceful.watcher(),
                stop: self.stop.clone(),
            };
            let tls = self.tls.clone();
            let proxy = self.proxy.clone();
            let open = metrics.connection_opened();
            tokio::spawn(async move {
                let _permit = permit;
                let _open = open;
                connection.serve(stream, tls, proxy).await;
            });
        }
        drop(listener);
        let mut cut = self.cut.clone();
        tokio::select! {
            () = graceful.shutdown() => {}
            // Requests still in flight, or an HTTP/2 client that has not acknowledged its
            // GOAWAY: both are cut off.
            () = tokio::time::sleep(self.grace) => tracing::warn!("shutdown grace elapsed with connections still open; closing them"),
            _ = cut.wait_for(|cut| *cut) => {}
        }
        Ok(())
    }
}
