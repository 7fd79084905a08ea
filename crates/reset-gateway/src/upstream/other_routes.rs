//! A path under `other_routes: forward`, passed on to QuickBlox as it came and streamed
//! both ways.

use std::net::IpAddr;
use std::time::Duration;

use http::header::HOST;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::Either;
use hyper::body::Incoming;
use reset_guard::GuardBody;
use tokio::time::error::Elapsed;

use super::client_body::{BodyWatch, ClientBody, WholeBody};
use super::forwarding_headers::replace_forwarding;
use super::streamed_body::{AnswerWatch, StreamedBody};
use super::{blame, is_final, Answer, Failure, UpstreamClient};
use crate::hop_by_hop;
use crate::refusal::Refusal;
use crate::request_id::X_REQUEST_ID;

impl UpstreamClient {
    /// Another path under `other_routes: forward`: passed on as it came, less hop-by-hop
    /// and framing headers, streamed both ways; the timeout covers the answer's head from
    /// the client's body's last part (`while_sending`), each wait for more of that body
    /// (`ClientBody`), and then each wait for the answer's body (`StreamedBody`). A
    /// failure of the client's own body is the client's error (400, or 408 when it stalled),
    /// never QuickBlox's.
    pub(super) async fn forward_other(
        &self,
        request: Request<Incoming>,
        (peer, client): (Option<IpAddr>, Option<IpAddr>),
        watch: BodyWatch,
        owns_cors: bool,
    ) -> Answer {
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        // A tunnel, or a target that is no path (asterisk-form; authority-form, which a
        // request line may carry with any method): nothing QuickBlox's API would read as
        // sent. And TRACE, whose answer would echo the request's headers (cookies and
        // credentials) to whatever script sent it; nginx refuses it too.
        let authority_form = parts.uri.scheme().is_none() && parts.uri.authority().is_some();
        let refused = parts.method == Method::CONNECT || parts.method == Method::TRACE;
        if refused || authority_form || !path.starts_with('/') {
            return (Err(Refusal::NotProxied.into()), None);
        }
        if !only_chunked(&parts.headers) {
            return (Err(Refusal::TransferCodingUnsupported.into()), None);
        }
        // The gateway's own request id, whatever the client's Connection header names.
        let request_id = parts.headers.get(&X_REQUEST_ID).cloned();
        let Ok(uri) = Uri::try_from(format!("{}{}", self.prefix, path)) else {
            let failure = Failure::upstream(Refusal::UpstreamUnavailable, "no valid target");
            return self.reported((Err(failure), None), request_id.as_ref());
        };
        hop_by_hop::strip(&mut parts.headers);
        if let Some(id) = &request_id {
            parts.headers.insert(X_REQUEST_ID, id.clone());
        }
        parts.headers.remove(HOST);
        // The gateway's X-Forwarded-For is the one account of where the request came from.
        replace_forwarding(&mut parts.headers, peer, client);
        let head = parts.method == Method::HEAD;
        // hyper's client sends a GET's or HEAD's body of unknown length (a chunked one) as
        // no body at all unless told its coding: the body the client sent is passed on,
        // not dropped. (Over HTTP/2 to QuickBlox the header is left out, as it must be.)
        let unsized_body = !body.is_end_stream() && body.size_hint().exact().is_none();
        if unsized_body && (head || parts.method == Method::GET) {
            parts.headers.insert(
                http::header::TRANSFER_ENCODING,
                http::HeaderValue::from_static("chunked"),
            );
        }
        // An idempotent request without a body can go again on a new connection when a
        // kept one closed under it (as nginx retries one on a cached connection); one with
        // a body cannot, its bytes being read on the way.
        let replayable = parts.method.is_idempotent() && body.is_end_stream();
        let again = replayable.then(|| (parts.method.clone(), uri.clone(), parts.headers.clone()));
        let replay = again.as_ref().map(|(method, uri, headers)| {
            move || {
                let mut upstream = Request::new(Either::Left(WholeBody::default()));
                *upstream.method_mut() = method.clone();
                *upstream.uri_mut() = uri.clone();
                *upstream.headers_mut() = headers.clone();
                upstream
            }
        });
        let replay = replay
            .as_ref()
            .map(|r| r as &(dyn Fn() -> Request<super::UpstreamBody> + Sync));
        // Each wait for more of the client's body is bounded as each wait for the answer's.
        // `watch` is the server's on a request with a body (its time running out while the
        // body still arrives is then the client's doing, not QuickBlox's).
        let body = ClientBody::new(body, self.settings.timeout, &watch);
        // A small body of a declared length is read whole before QuickBlox is asked (as
        // nginx's proxy_request_buffering does): one the client breaks off then never
        // reaches QuickBlox, nor costs the upstream connection it would have broken (an
        // HTTP/2 client could break one on every stream, and open a connection after
        // each batch).
        let body = match body.size_hint().exact() {
            Some(1..=BUFFERED_BODY) => match http_body_util::BodyExt::collect(body).await {
                Ok(whole) => Either::Left(WholeBody::new(whole)),
                Err(_) => {
                    let refusal = match watch.stalled() {
                        true => Refusal::ClientBodyTimeout,
                        false => Refusal::ClientBodyInvalid,
                    };
                    return self.reported((Err(refusal.into()), None), request_id.as_ref());
                }
            },
            _ => Either::Right(Box::new(body)),
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = parts.method;
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = parts.headers;
        let send = self.pool.send(upstream, replay);
        let answer = match while_sending(send, self.settings.timeout, &watch).await {
            Ok(Ok((response, _))) if !is_final(response.status()) => {
                let status = response.status();
                let cause = format!("status {}, not a final answer", status.as_u16());
                (
                    Err(Failure::upstream(Refusal::UpstreamUnavailable, cause)),
                    Some(status),
                )
            }
            // A body in a coding the gateway would drop when it frames the answer anew.
            Ok(Ok((response, _))) if !only_chunked(response.headers()) => {
                let cause = "answer in a transfer coding other than chunked";
                let failure = Failure::upstream(Refusal::UpstreamUnavailable, cause);
                (Err(failure), Some(response.status()))
            }
            Ok(Ok((response, lease))) => {
                let (mut parts, body) = response.into_parts();
                // An answer to HEAD has no body to frame: its Content-Length is the size
                // of the body a GET would get, which only QuickBlox knows.
                let length = head
                    .then(|| parts.headers.get(http::header::CONTENT_LENGTH).cloned())
                    .flatten();
                hop_by_hop::strip(&mut parts.headers);
                if let Some(length) = length {
                    parts.headers.insert(http::header::CONTENT_LENGTH, length);
                }
                if owns_cors {
                    // The gateway's CORS answer is the one: merged with QuickBlox's, an
                    // allowed origin could gain its Allow-Credentials.
                    let theirs: Vec<_> = parts
                        .headers
                        .keys()
                        .filter(|name| name.as_str().starts_with("access-control-"))
                        .cloned()
                        .collect();
                    for name in theirs {
                        parts.headers.remove(name);
                    }
                }
                parts.version = Version::HTTP_11;
                let status = parts.status;
                let answer = AnswerWatch {
                    failures: self.failures.clone(),
                    request_id: request_id.clone(),
                };
                let sent = watch.clone();
                let body = StreamedBody::new(body, (lease, sent), self.settings.timeout, answer);
                (
                    Ok(Response::from_parts(parts, GuardBody::inner(body))),
                    Some(status),
                )
            }
            Ok(Err(error)) => (Err(blame(error, &watch)), None),
            Err(_) if watch.waiting_on_client() => (Err(Refusal::ClientBodyTimeout.into()), None),
            Err(_) => {
                let cause = "no answer within upstream.timeout";
                (
                    Err(Failure::upstream(Refusal::UpstreamTimeout, cause)),
                    None,
                )
            }
        };
        self.reported(answer, request_id.as_ref())
    }
}

/// The largest body of a declared length read whole before QuickBlox is asked.
const BUFFERED_BODY: u64 = 64 * 1024;

/// `send`, given `timeout` for its answer from the client's body's last part: an upload
/// that arrives steadily but takes longer than that is no late answer (each of its waits
/// for the client is bounded by [`ClientBody`] itself).
async fn while_sending<F: std::future::Future>(
    send: F,
    timeout: Duration,
    watch: &BodyWatch,
) -> Result<F::Output, Elapsed> {
    let mut send = std::pin::pin!(send);
    let mut deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, send.as_mut()).await {
            Ok(answer) => return Ok(answer),
            Err(elapsed) => {
                let since_moved = watch.moved_at() + timeout;
                if since_moved <= deadline {
                    return Err(elapsed);
                }
                deadline = since_moved;
            }
        }
    }
}

/// Whether every transfer coding named is `chunked` (or none is): hyper decodes that
/// framing and the other side gets the body framed anew; any other coding (`gzip`) would
/// be lost on the way, the bytes passed on as if plain.
fn only_chunked(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b','))
        .all(|coding| {
            let coding = coding.trim_ascii();
            coding.is_empty() || coding.eq_ignore_ascii_case(b"chunked")
        })
}
