//! The forwarder: the service behind the guard that talks to QuickBlox (SPEC §3 steps 5-6).

use std::convert::Infallible;
use std::error::Error as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Either, Empty, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use reset_guard::{encode_query_value, GuardBody, GuardedRequest, PeerAddr, Rejection};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::time::{timeout, Instant};

use crate::config::UpstreamSettings;
use crate::hop_by_hop::{self, connection_named};
use crate::request_id::X_REQUEST_ID;

/// Largest upstream body read for a reset answer; QuickBlox's are a few bytes.
const MAX_RESET_BODY: usize = 64 * 1024;

/// What is sent upstream: nothing for a reset, the client's body for a forwarded route.
pub type UpstreamBody = Either<Empty<Bytes>, Incoming>;

/// What the forwarder answers with: a reset answer read whole, or a streamed one.
pub type ForwardBody = GuardBody<Incoming>;

/// How the upstream exchange went, left in the response extensions for the access log.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamExchange {
    /// QuickBlox's status, when it answered.
    pub status: Option<http::StatusCode>,
    /// Time from sending to the whole answer (reset) or its head (forwarded route).
    pub duration: Duration,
}

/// Forwards requests to QuickBlox over a pooled HTTP/1.1 or HTTP/2 client. Clones share
/// one client; [`reload`](Forwarder::reload) replaces it for every clone.
#[derive(Clone)]
pub struct Forwarder {
    inner: Arc<ArcSwap<Inner>>,
}

struct Inner {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    settings: UpstreamSettings,
}

impl Forwarder {
    /// Builds the client: TLS via rustls with the web PKI roots plus `ca_file`.
    pub fn new(settings: UpstreamSettings) -> anyhow::Result<Forwarder> {
        Ok(Forwarder {
            inner: Arc::new(ArcSwap::from_pointee(Inner::new(settings)?)),
        })
    }

    /// Prepares a client for new settings without using it yet (a reload applies it
    /// only once everything else in the file has been checked too).
    pub fn prepare(settings: UpstreamSettings) -> anyhow::Result<PreparedUpstream> {
        Ok(PreparedUpstream(Inner::new(settings)?))
    }

    /// Uses a prepared client from now on; requests in flight finish on the old one.
    pub fn apply(&self, prepared: PreparedUpstream) {
        self.inner.store(Arc::new(prepared.0));
    }
}

/// A client built from reloaded settings, not yet in use.
pub struct PreparedUpstream(Inner);

impl Inner {
    fn new(settings: UpstreamSettings) -> anyhow::Result<Inner> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = &settings.ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .with_context(|| {
                    format!(
                        "upstream.ca_file: cannot read certificates from {}",
                        path.display()
                    )
                })?;
            anyhow::ensure!(
                !certs.is_empty(),
                "upstream.ca_file: no certificate in {}",
                path.display()
            );
            for cert in certs {
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
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle)
            .build(connector);
        Ok(Inner { client, settings })
    }
}

impl Forwarder {
    async fn forward(self, mut request: Request<Incoming>) -> Response<ForwardBody> {
        let started = Instant::now();
        let inner = self.inner.load_full();
        let guarded = request.extensions_mut().remove::<GuardedRequest>();
        let (response, status) = match &guarded {
            Some(guarded) => inner.forward_reset(request, guarded).await,
            None => inner.forward_other(request).await,
        };
        let mut response = match response {
            Ok(response) => response,
            Err(rejection) => {
                let mut response = rejection.to_response().map(GuardBody::full);
                response.extensions_mut().insert(rejection);
                response
            }
        };
        response.extensions_mut().insert(UpstreamExchange {
            status,
            duration: started.elapsed(),
        });
        if let Some(guarded) = guarded {
            response.extensions_mut().insert(guarded);
        }
        response
    }
}

impl Inner {
    /// A checked reset: a fresh request carrying only the email, the server key, the
    /// request id, the forwarding chain and the allowed headers; the answer read whole
    /// within the timeout, so a never-ending body is a 504 too.
    async fn forward_reset(
        &self,
        request: Request<Incoming>,
        guarded: &GuardedRequest,
    ) -> (
        Result<Response<ForwardBody>, Rejection>,
        Option<http::StatusCode>,
    ) {
        let settings = &self.settings;
        let uri = format!(
            "{}{}?email={}",
            settings.base,
            request.uri().path(),
            encode_query_value(guarded.email().as_str())
        );
        let Ok(uri) = uri.parse::<Uri>() else {
            return (Err(Rejection::UpstreamUnavailable), None);
        };
        let incoming = request.headers();
        let mut headers = HeaderMap::with_capacity(settings.pass_headers.len() + 3);
        if let Some(key) = incoming.get(AUTHORIZATION) {
            headers.insert(AUTHORIZATION, key.clone());
        }
        if let Some(id) = incoming.get(&X_REQUEST_ID) {
            headers.insert(X_REQUEST_ID.clone(), id.clone());
        }
        let peer = request
            .extensions()
            .get::<PeerAddr>()
            .map(|p| p.0.ip().to_canonical());
        if let Some(chain) = forwarded_for(incoming, peer, guarded.client_ip().ip()) {
            headers.insert("x-forwarded-for", chain);
        }
        let hop_named: Vec<_> = connection_named(incoming).collect();
        for name in &settings.pass_headers {
            if hop_named.contains(name) {
                continue;
            }
            for value in incoming.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let mut upstream = Request::new(Either::Left(Empty::new()));
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = headers;

        let client = &self.client;
        let exchange = async {
            let response = client.request(upstream).await.map_err(classify)?;
            let (mut parts, body) = response.into_parts();
            let status = parts.status;
            let body = Limited::new(body, MAX_RESET_BODY)
                .collect()
                .await
                .map_err(|_| (Rejection::UpstreamUnavailable, Some(status)))?
                .to_bytes();
            hop_by_hop::strip(&mut parts.headers);
            parts.version = Version::HTTP_11;
            Ok::<_, (Rejection, Option<http::StatusCode>)>(Response::from_parts(
                parts,
                GuardBody::full(body),
            ))
        };
        match timeout(settings.timeout, exchange).await {
            Ok(Ok(response)) => {
                let status = response.status();
                (Ok(response), Some(status))
            }
            Ok(Err((rejection, status))) => (Err(rejection), status),
            Err(_) => (Err(Rejection::UpstreamTimeout), None),
        }
    }

    /// Another path under `other_routes: forward`: passed on as it came, less hop-by-hop
    /// headers, streamed both ways; the timeout covers the answer's head.
    async fn forward_other(
        &self,
        request: Request<Incoming>,
    ) -> (
        Result<Response<ForwardBody>, Rejection>,
        Option<http::StatusCode>,
    ) {
        let settings = &self.settings;
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let Ok(uri) = format!("{}{}", settings.base, path).parse::<Uri>() else {
            return (Err(Rejection::UpstreamUnavailable), None);
        };
        let peer = parts
            .extensions
            .get::<PeerAddr>()
            .map(|p| p.0.ip().to_canonical());
        hop_by_hop::strip(&mut parts.headers);
        parts.headers.remove(HOST);
        parts.headers.remove("x-forwarded-for");
        if let Some(peer) = peer {
            parts
                .headers
                .insert("x-forwarded-for", header_value(&peer.to_string()));
        }
        let mut upstream = Request::new(Either::Right(body));
        *upstream.method_mut() = parts.method;
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = parts.headers;
        match timeout(settings.timeout, self.client.request(upstream)).await {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                hop_by_hop::strip(&mut parts.headers);
                parts.version = Version::HTTP_11;
                let status = parts.status;
                (
                    Ok(Response::from_parts(parts, GuardBody::inner(body))),
                    Some(status),
                )
            }
            Ok(Err(error)) => (Err(classify(error).0), None),
            Err(_) => (Err(Rejection::UpstreamTimeout), None),
        }
    }
}

/// The chain sent upstream: the client's own chain when it came through trusted proxies
/// (the guard resolved a client other than the peer), then the peer.
fn forwarded_for(
    incoming: &HeaderMap,
    peer: Option<std::net::IpAddr>,
    client: std::net::IpAddr,
) -> Option<HeaderValue> {
    let peer = peer?;
    if peer == client {
        return Some(header_value(&peer.to_string()));
    }
    let mut chain = String::new();
    for value in incoming.get_all("x-forwarded-for") {
        if let Ok(value) = value.to_str() {
            if !chain.is_empty() {
                chain.push_str(", ");
            }
            chain.push_str(value.trim());
        }
    }
    if !chain.is_empty() {
        chain.push_str(", ");
    }
    chain.push_str(&peer.to_string());
    HeaderValue::from_str(&chain).ok()
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("an IP address is a valid header value")
}

/// A connect that timed out is a 504; everything else (refused, reset, TLS, protocol) a 502.
fn classify(error: hyper_util::client::legacy::Error) -> (Rejection, Option<http::StatusCode>) {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return (Rejection::UpstreamTimeout, None);
            }
        }
        source = cause.source();
    }
    tracing::debug!(error = %error, "upstream request failed");
    (Rejection::UpstreamUnavailable, None)
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
