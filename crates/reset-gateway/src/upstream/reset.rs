//! A checked reset, sent to QuickBlox as a fresh request built from what the guard checked.

use std::net::IpAddr;

use http::header::AUTHORIZATION;
use http::{HeaderMap, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Either, Empty, Limited};
use hyper::body::Incoming;
use reset_guard::{GuardBody, GuardedRequest};
use tokio::time::timeout;

use super::forwarding_headers::{forwarded_for, X_FORWARDED_FOR};
use super::{classify, is_final, Answer, UpstreamBody, UpstreamClient};
use crate::hop_by_hop::{self, connection_named};
use crate::refusal::Refusal;
use crate::request_id::X_REQUEST_ID;

/// Largest upstream body read for a reset answer; QuickBlox's are a few bytes.
const MAX_RESET_BODY: usize = 64 * 1024;

impl UpstreamClient {
    /// A checked reset from `peer`: a fresh request carrying only the email, the server
    /// key, the request id, the forwarding chain and the allowed headers; the answer read
    /// whole within the timeout, so a never-ending body is a 504 too.
    pub(super) async fn forward_reset(
        &self,
        request: Request<Incoming>,
        guarded: &GuardedRequest,
        peer: Option<IpAddr>,
    ) -> Answer {
        // Built again only if a kept connection turns out dead under it.
        let build = || self.reset_request(&request, guarded, peer);
        let Some(upstream) = build() else {
            return (Err(Refusal::UpstreamUnavailable), None);
        };
        let replay = || build().expect("built once already");

        // Pinned where it is: the timeout below holds a pointer to it, not a copy of it.
        let exchange = std::pin::pin!(async {
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
        });
        match timeout(self.settings.timeout, exchange).await {
            Ok(Ok(response)) => {
                let status = response.status();
                (Ok(response), Some(status))
            }
            Ok(Err((refusal, status))) => (Err(refusal), status),
            Err(_) => (Err(Refusal::UpstreamTimeout), None),
        }
    }

    /// The request sent upstream for a checked reset from `peer`; none if its target is
    /// not a valid URI.
    fn reset_request(
        &self,
        request: &Request<Incoming>,
        guarded: &GuardedRequest,
        peer: Option<IpAddr>,
    ) -> Option<Request<UpstreamBody>> {
        let settings = &self.settings;
        let incoming = request.headers();
        let (path, email) = (request.uri().path(), guarded.email());
        // The target alone: the pool knows the origin, and HTTP/1.1 sends only this.
        let mut uri = String::with_capacity(self.prefix.len() + path.len() + 7 + 3 * email.len());
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
    }
}
