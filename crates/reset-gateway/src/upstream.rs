//! The forwarder: the service behind the guard that talks to QuickBlox (steps 7 and 8 of
//! ARCHITECTURE.md, "The request's path").
//!
//! This module holds the forwarder and the client it swaps on reload; `reset` sends a
//! checked reset, `other_routes` a path passed on as it came, `forwarding_headers` writes
//! where the request came from, `pool` holds the connections to QuickBlox, and
//! `client_body` and `streamed_body` carry the bodies each way.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use http::{Request, Response, Uri};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use reset_guard::{ClientIp, GuardBody, GuardedRequest, PeerAddr};
use tokio::time::Instant;

use crate::config::UpstreamSettings;
use crate::refusal::Refusal;
use crate::tls::read_certificates;

mod cause;
mod client_body;
mod failures;
mod forwarding_headers;
mod idle_deadline;
mod other_routes;
mod pool;
mod reset;
mod streamed_body;

use client_body::{ClientBody, WholeBody};
use failures::{Failure, FailureLog};
use pool::{Pool, SendError};

pub use client_body::BodyWatch;
pub use streamed_body::StreamedBody;

/// What is sent upstream: nothing for a reset; for a forwarded route the client's body,
/// read whole first when it is small, else streamed. The streamed body is boxed: a reset's
/// request, moved several times on its way through hyper, then stays small (unboxed, the
/// moves cost a reset about 700 instructions of `memcpy`, benches/README.md).
pub type UpstreamBody = Either<WholeBody, Box<ClientBody>>;

/// What the forwarder answers with: a reset answer read whole, or a streamed one.
pub type ForwardBody = GuardBody<StreamedBody>;

/// What forwarding one request came to: the answer or why there is none, and QuickBlox's
/// status when it answered.
type Answer = (
    Result<Response<ForwardBody>, Failure>,
    Option<http::StatusCode>,
);

/// How the upstream exchange went, left in the response extensions for the access log.
#[derive(Debug, Clone)]
pub struct UpstreamExchange {
    /// QuickBlox's status, when it answered.
    pub status: Option<http::StatusCode>,
    /// Time from sending to the whole answer (reset) or its head (forwarded route).
    pub duration: Duration,
    /// The gateway's own answer, when the exchange failed.
    pub refusal: Option<Refusal>,
    /// What QuickBlox did wrong, in a few words, when the failure was its own.
    pub error: Option<Box<str>>,
}

/// Forwards requests to QuickBlox over pooled HTTP/1.1 or HTTP/2 connections. Clones share
/// one pool; [`apply`](Forwarder::apply) replaces it for every clone.
#[derive(Clone)]
pub struct Forwarder {
    client: Arc<ArcSwap<UpstreamClient>>,
    /// The gateway answers CORS itself (`server.cors`): QuickBlox's own `Access-Control-*`
    /// headers on a forwarded route would be merged with its answer.
    owns_cors: bool,
}

/// The client a forwarder sends with: its pool of connections to QuickBlox and the
/// settings it was built from. A reload replaces it whole.
struct UpstreamClient {
    pool: Pool,
    /// The path `upstream.url` puts before every upstream path (usually none).
    prefix: String,
    settings: UpstreamSettings,
    /// Shared with the streamed answers, which may fail after their head.
    failures: Arc<FailureLog>,
}

impl Forwarder {
    /// Builds the client: TLS via rustls with the web PKI roots plus `ca_file`. With
    /// `owns_cors`, a forwarded route's answer loses QuickBlox's `Access-Control-*` headers.
    pub fn new(settings: UpstreamSettings, owns_cors: bool) -> anyhow::Result<Forwarder> {
        Ok(Forwarder {
            client: Arc::new(ArcSwap::from_pointee(UpstreamClient::new(settings)?)),
            owns_cors,
        })
    }

    /// Prepares a client for new settings without using it yet (a reload applies it
    /// only once everything else in the file has been checked too).
    pub fn prepare(settings: UpstreamSettings) -> anyhow::Result<PreparedUpstream> {
        Ok(PreparedUpstream(UpstreamClient::new(settings)?))
    }

    /// Uses a prepared client from now on; requests in flight finish on the old one.
    pub fn apply(&self, prepared: PreparedUpstream) {
        self.client.store(Arc::new(prepared.0));
    }
}

/// A client built from reloaded settings, not yet in use.
pub struct PreparedUpstream(UpstreamClient);

impl UpstreamClient {
    fn new(settings: UpstreamSettings) -> anyhow::Result<UpstreamClient> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = &settings.ca_file {
            for cert in read_certificates("upstream.ca_file", path)? {
                roots
                    .add(cert)
                    .context("upstream.ca_file: invalid certificate")?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let origin: Uri = settings.base.parse().context("upstream.url")?;
        let prefix = origin.path().trim_end_matches('/').to_owned();
        // Host and port, the scheme's default port written out (`api.quickblox.com:443`).
        let default_port = match origin.scheme() == Some(&http::uri::Scheme::HTTPS) {
            true => 443,
            false => 80,
        };
        let upstream = origin.authority().map_or_else(String::new, |a| {
            format!("{}:{}", a.host(), a.port_u16().unwrap_or(default_port))
        });
        let pool = Pool::new(
            connector,
            origin,
            settings.pool_max_idle,
            settings.pool_idle_timeout,
            settings.connect_timeout,
        )?;
        Ok(UpstreamClient {
            pool,
            prefix,
            settings,
            failures: Arc::new(FailureLog::new(upstream)),
        })
    }
}

impl UpstreamClient {
    /// `answer`, its failure (if QuickBlox's) reported as the request `request_id`'s.
    fn reported(&self, answer: Answer, request_id: Option<&http::HeaderValue>) -> Answer {
        if let (
            Err(Failure {
                cause: Some(cause), ..
            }),
            _,
        ) = &answer
        {
            let id = request_id.and_then(|id| id.to_str().ok());
            self.failures.report(cause, id);
        }
        answer
    }
}

impl Forwarder {
    async fn forward(self, mut request: Request<Incoming>) -> Response<ForwardBody> {
        let started = Instant::now();
        let client = self.client.load_full();
        // The request's extension table becomes the answer's: the guard's record of the
        // request stays where it is instead of moving into a table of its own.
        let mut extensions = std::mem::take(request.extensions_mut());
        let peer = extensions
            .remove::<PeerAddr>()
            .map(|p| p.0.ip().to_canonical());
        let (response, status) = match extensions.get::<GuardedRequest>() {
            Some(guarded) => client.forward_reset(request, guarded, peer).await,
            None => {
                let resolved = extensions.get::<ClientIp>().map(ClientIp::ip);
                let origin = (peer, resolved);
                let watch = extensions.remove::<BodyWatch>().unwrap_or_default();
                // Boxed: its state (a body read whole, the wait while one is sent) is far
                // larger than a reset's, and every reset's future would be as large.
                Box::pin(client.forward_other(request, origin, watch, self.owns_cors)).await
            }
        };
        let (mut response, refusal, error) = match response {
            Ok(response) => (response, None, None),
            Err(Failure { refusal, cause }) => {
                let response = refusal.to_response().map(GuardBody::full);
                (response, Some(refusal), cause)
            }
        };
        extensions.insert(UpstreamExchange {
            status,
            duration: started.elapsed(),
            refusal,
            error,
        });
        extensions.extend(std::mem::take(response.extensions_mut()));
        *response.extensions_mut() = extensions;
        response
    }
}

/// Whether QuickBlox's answer is a final one: 2xx-5xx. hyper hands back an unrequested
/// `101 Switching Protocols` as final, and passing it on would give an HTTP/1.1 client a
/// dead connection and an HTTP/2 client a status RFC 9113 §8.6 forbids.
fn is_final(status: http::StatusCode) -> bool {
    (200..600).contains(&status.as_u16())
}

/// Whose fault a failed forwarded exchange is: the client's if its body broke.
fn blame(error: SendError, watch: &BodyWatch) -> Failure {
    if watch.failed() {
        tracing::debug!(%error, "client request body failed");
        return Refusal::ClientBodyInvalid.into();
    }
    if watch.stalled() {
        return Refusal::ClientBodyTimeout.into();
    }
    classify(error)
}

/// A connect that timed out is a 504; everything else (refused, reset, TLS, protocol) a 502.
fn classify(error: SendError) -> Failure {
    let cause = cause::upstream_error(error.chain());
    let timed_out = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    });
    let refusal = if timed_out {
        Refusal::UpstreamTimeout
    } else {
        Refusal::UpstreamUnavailable
    };
    Failure::upstream(refusal, cause)
}

impl tower::Service<Request<Incoming>> for Forwarder {
    type Response = Response<ForwardBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let forwarder = self.clone();
        Box::pin(async move { Ok(forwarder.forward(request).await) })
    }
}
