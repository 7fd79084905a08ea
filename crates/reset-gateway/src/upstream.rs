//! The forwarder: the service behind the guard that talks to QuickBlox (steps 7 and 8 of
//! ARCHITECTURE.md, "The request's path").

use std::convert::Infallible;
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
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Either, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use reset_guard::{GuardBody, GuardedRequest, PeerAddr};
use tokio::time::{timeout, Instant};

use crate::config::UpstreamSettings;
use crate::hop_by_hop::{self, connection_named};
use crate::refusal::Refusal;
use crate::request_id::X_REQUEST_ID;
use crate::tls::read_certificates;

mod client_body;
mod pool;

use client_body::{BodyWatch, ClientBody};
use pool::{Lease, Pool, SendError};

/// The forwarding chain sent upstream.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The standard forwarding header (RFC 7239), which a client could fill with anything.
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The client address as some servers read it, which a client could fill with anything.
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Largest upstream body read for a reset answer; QuickBlox's are a few bytes.
const MAX_RESET_BODY: usize = 64 * 1024;

/// What is sent upstream: nothing for a reset, the client's body for a forwarded route.
pub type UpstreamBody = Either<Empty<Bytes>, ClientBody>;

/// What the forwarder answers with: a reset answer read whole, or a streamed one.
pub type ForwardBody = GuardBody<StreamedBody>;

/// How the upstream exchange went, left in the response extensions for the access log.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamExchange {
    /// QuickBlox's status, when it answered.
    pub status: Option<http::StatusCode>,
    /// Time from sending to the whole answer (reset) or its head (forwarded route).
    pub duration: Duration,
}

/// Forwards requests to QuickBlox over pooled HTTP/1.1 or HTTP/2 connections. Clones share
/// one pool; [`apply`](Forwarder::apply) replaces it for every clone.
#[derive(Clone)]
pub struct Forwarder {
    inner: Arc<ArcSwap<Inner>>,
}

struct Inner {
    pool: Pool,
    /// The path `upstream.url` puts before every upstream path (usually none).
    prefix: String,
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
        let pool = Pool::new(
            connector,
            origin,
            settings.pool_max_idle,
            settings.pool_idle_timeout,
        )?;
        Ok(Inner {
            pool,
            prefix,
            settings,
        })
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
            Err(refusal) => refusal.to_response().map(GuardBody::full),
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
        Result<Response<ForwardBody>, Refusal>,
        Option<http::StatusCode>,
    ) {
        let settings = &self.settings;
        let incoming = request.headers();
        let peer = request
            .extensions()
            .get::<PeerAddr>()
            .map(|p| p.0.ip().to_canonical());
        // Built again only if a kept connection turns out dead under it.
        let build = || -> Option<Request<UpstreamBody>> {
            let (path, email) = (request.uri().path(), guarded.email());
            // The target alone: the pool knows the origin, and HTTP/1.1 sends only this.
            let mut uri =
                String::with_capacity(self.prefix.len() + path.len() + 7 + 3 * email.len());
            uri.push_str(&self.prefix);
            uri.push_str(path);
            uri.push('?');
            guarded.write_email_query(&mut uri);
            let uri = Uri::try_from(uri).ok()?;
            let mut headers = HeaderMap::with_capacity(settings.pass_headers.len() + 3);
            if let Some(key) = incoming.get(AUTHORIZATION) {
                headers.insert(AUTHORIZATION, key.clone());
            }
            if let Some(id) = incoming.get(&X_REQUEST_ID) {
                headers.insert(X_REQUEST_ID.clone(), id.clone());
            }
            if let Some(chain) = forwarded_for(incoming, peer, guarded.client_ip()) {
                headers.insert(X_FORWARDED_FOR, chain);
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
            Some(upstream)
        };
        let Some(upstream) = build() else {
            return (Err(Refusal::UpstreamUnavailable), None);
        };
        let replay = || build().expect("built once already");

        let exchange = async {
            let (response, lease) = self
                .pool
                .send(upstream, Some(&replay))
                .await
                .map_err(classify)?;
            let (mut parts, body) = response.into_parts();
            let status = parts.status;
            if !is_final(status) {
                // Dropping the lease closes the connection: it was switched or is out of step.
                return Err((Refusal::UpstreamUnavailable, Some(status)));
            }
            let body = Limited::new(body, MAX_RESET_BODY)
                .collect()
                .await
                .map_err(|_| (Refusal::UpstreamUnavailable, Some(status)))?
                .to_bytes();
            lease.release();
            hop_by_hop::strip(&mut parts.headers);
            parts.version = Version::HTTP_11;
            Ok::<_, (Refusal, Option<http::StatusCode>)>(Response::from_parts(
                parts,
                GuardBody::full(body),
            ))
        };
        match timeout(settings.timeout, exchange).await {
            Ok(Ok(response)) => {
                let status = response.status();
                (Ok(response), Some(status))
            }
            Ok(Err((refusal, status))) => (Err(refusal), status),
            Err(_) => (Err(Refusal::UpstreamTimeout), None),
        }
    }

    /// Another path under `other_routes: forward`: passed on as it came, less hop-by-hop
    /// and framing headers, streamed both ways; the timeout covers the answer's head. A
    /// failure of the client's own body is the client's error (400, or 408 when it stalled),
    /// never QuickBlox's.
    async fn forward_other(
        &self,
        request: Request<Incoming>,
    ) -> (
        Result<Response<ForwardBody>, Refusal>,
        Option<http::StatusCode>,
    ) {
        let settings = &self.settings;
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let Ok(uri) = Uri::try_from(format!("{}{}", self.prefix, path)) else {
            return (Err(Refusal::UpstreamUnavailable), None);
        };
        let peer = parts
            .extensions
            .get::<PeerAddr>()
            .map(|p| p.0.ip().to_canonical());
        hop_by_hop::strip(&mut parts.headers);
        parts.headers.remove(HOST);
        // The gateway's X-Forwarded-For is the one account of where the request came from.
        for spoofable in [&X_FORWARDED_FOR, &FORWARDED, &X_REAL_IP] {
            parts.headers.remove(spoofable);
        }
        if let Some(peer) = peer {
            parts.headers.insert(X_FORWARDED_FOR, ip_header(peer));
        }
        let (body, watch) = ClientBody::new(body);
        let mut upstream = Request::new(Either::Right(body));
        *upstream.method_mut() = parts.method;
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = parts.headers;
        match timeout(settings.timeout, self.pool.send(upstream, None)).await {
            Ok(Ok((response, _))) if !is_final(response.status()) => {
                (Err(Refusal::UpstreamUnavailable), Some(response.status()))
            }
            Ok(Ok((response, lease))) => {
                let (mut parts, body) = response.into_parts();
                hop_by_hop::strip(&mut parts.headers);
                parts.version = Version::HTTP_11;
                let status = parts.status;
                let body = StreamedBody {
                    body,
                    lease: Some(lease),
                };
                (
                    Ok(Response::from_parts(parts, GuardBody::inner(body))),
                    Some(status),
                )
            }
            Ok(Err(error)) => (Err(blame(error, &watch)), None),
            Err(_) if watch.waiting_on_client() => (Err(Refusal::ClientBodyTimeout), None),
            Err(_) => (Err(Refusal::UpstreamTimeout), None),
        }
    }
}

/// Whether QuickBlox's answer is a final one: 2xx-5xx. hyper hands back an unrequested
/// `101 Switching Protocols` as final, and passing it on would give an HTTP/1.1 client a
/// dead connection and an HTTP/2 client a status RFC 9113 §8.6 forbids.
fn is_final(status: http::StatusCode) -> bool {
    (200..600).contains(&status.as_u16())
}

/// Whose fault a failed forwarded exchange is: the client's if its body broke.
fn blame(error: SendError, watch: &BodyWatch) -> Refusal {
    if watch.failed() {
        tracing::debug!(%error, "client request body failed");
        return Refusal::ClientBodyInvalid;
    }
    classify(error).0
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
        return Some(ip_header(peer));
    }
    let mut chain = String::new();
    for value in incoming.get_all(X_FORWARDED_FOR) {
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

/// An address as a header value. IPv4, the common case, is written out by hand: it is on
/// every forwarded request, and the formatting machinery costs more than the rest of it.
fn ip_header(ip: std::net::IpAddr) -> HeaderValue {
    let std::net::IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string()).expect("an address is a valid header");
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&text[..len]).expect("digits and dots are a valid header")
}

/// A connect that timed out is a 504; everything else (refused, reset, TLS, protocol) a 502.
fn classify(error: SendError) -> (Refusal, Option<http::StatusCode>) {
    // The access log says only upstream_unavailable or upstream_timeout; the cause is here.
    tracing::warn!(
        upstream_error = crate::telemetry::upstream_error(error.chain()),
        %error,
        "upstream request failed"
    );
    let timed_out = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    });
    if timed_out {
        return (Refusal::UpstreamTimeout, None);
    }
    (Refusal::UpstreamUnavailable, None)
}

/// An answer streamed from QuickBlox; its connection goes back to the pool once the
/// body has been read to its end (servers stop polling a body that says it has ended, so
/// that is checked after each frame, and when the body is dropped).
pub struct StreamedBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl StreamedBody {
    fn release_if_read(&mut self) {
        if http_body::Body::is_end_stream(&self.body) {
            if let Some(lease) = self.lease.take() {
                lease.release();
            }
        }
    }
}

impl Drop for StreamedBody {
    fn drop(&mut self) {
        self.release_if_read();
    }
}

impl http_body::Body for StreamedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if frame.is_ready() {
            self.release_if_read();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_their_display_form() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "10.200.3.45",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header(ip).to_str().unwrap(), ip.to_string());
        }
    }
}
