//! A checked reset, sent to QuickBlox as a fresh request built from what the guard checked.

use std::net::IpAddr;

use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LANGUAGE, CONTENT_TYPE, RETRY_AFTER,
    VARY,
};
use http::{HeaderMap, HeaderName, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;
use reset_guard::{GuardBody, GuardedRequest};
use tokio::time::timeout;

use super::client_body::WholeBody;
use super::forwarding_headers::{forwarded_for, X_FORWARDED_FOR};
use super::{cause, classify, is_final, Answer, Failure, UpstreamBody, UpstreamClient};
use crate::hop_by_hop::connection_named;
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
            let failure = Failure::upstream(Refusal::UpstreamUnavailable, "no valid target");
            return self.reported((Err(failure), None), request.headers().get(&X_REQUEST_ID));
        };
        let replay = || build().expect("built once already");
        // The key as sent (a clone shares its wiped-on-drop buffer), to make sure no answer
        // hands it back.
        let upstream_key = upstream.headers().get(AUTHORIZATION).cloned();

        // Pinned where it is: the timeout below holds a pointer to it, not a copy of it.
        let exchange = std::pin::pin!(async {
            let (response, lease) = self
                .pool
                .send(upstream, Some(&replay))
                .await
                .map_err(|error| (classify(error), None))?;
            let (mut parts, body) = response.into_parts();
            let status = parts.status;
            let failed = |cause: String| {
                (
                    Failure::upstream(Refusal::UpstreamUnavailable, cause),
                    Some(status),
                )
            };
            if !is_final(status) {
                // Dropping the lease closes the connection: it was switched or is out of step.
                return Err(failed(format!(
                    "status {}, not a final answer",
                    status.as_u16()
                )));
            }
            let body = Limited::new(body, MAX_RESET_BODY)
                .collect()
                .await
                .map_err(|error| failed(body_error(error.as_ref())))?
                .to_bytes();
            lease.release();
            if status == http::StatusCode::UNAUTHORIZED {
                warn_key_refused();
            }
            // An answer the guard replaces whole (uniform answers) shows the client nothing
            // but that it came; one passed on is cut to what a client needs, and withheld
            // if it hands the key back (as a 502 for a 200 it would replace, it would tell
            // accounts apart).
            if !guarded.answer_replaced(status) {
                // A body in a content coding could be checked for the key only once
                // decoded, and the client would get it without its Content-Encoding.
                if coded(&parts.headers) {
                    warn_once_coded();
                    return Err(failed("answer in a content coding".to_owned()));
                }
                keep_answer_headers(&mut parts.headers);
                if let Some(key) = &upstream_key {
                    if carries(&parts.headers, &body, key.as_bytes()) {
                        warn_once_key_reflected();
                        return Err(failed("answer held the server API key".to_owned()));
                    }
                }
            }
            parts.version = Version::HTTP_11;
            Ok::<_, (Failure, Option<http::StatusCode>)>(Response::from_parts(
                parts,
                GuardBody::full(body),
            ))
        });
        let answer = match timeout(self.settings.timeout, exchange).await {
            Ok(Ok(response)) => {
                let status = response.status();
                return (Ok(response), Some(status));
            }
            Ok(Err((failure, status))) => (Err(failure), status),
            Err(_) => {
                let cause = "no whole answer within upstream.timeout";
                (
                    Err(Failure::upstream(Refusal::UpstreamTimeout, cause)),
                    None,
                )
            }
        };
        self.reported(answer, request.headers().get(&X_REQUEST_ID))
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
        // No Accept-Encoding: servers and CDNs compress only for a client that names a
        // coding (one that comes coded anyway is withheld, below `coded`).
        if let Some(id) = incoming.get(&X_REQUEST_ID) {
            headers.insert(X_REQUEST_ID.clone(), id.clone());
        }
        if let Some(chain) = forwarded_for(peer, guarded.client_ip()) {
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
        let mut upstream = Request::new(Either::Left(WholeBody::default()));
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = headers;
        Some(upstream)
    }
}

/// What of QuickBlox's answer to a reset reaches the client: the status, the body and
/// these headers. The rest (cookies, redirects, challenges, anything that might echo the
/// request) stays behind: the client asked the gateway, not QuickBlox.
const ANSWER_HEADERS: [HeaderName; 5] = [
    CONTENT_TYPE,
    CONTENT_LANGUAGE,
    CACHE_CONTROL,
    VARY,
    RETRY_AFTER,
];

fn keep_answer_headers(headers: &mut HeaderMap) {
    if headers.keys().all(|name| ANSWER_HEADERS.contains(name)) {
        return;
    }
    // What QuickBlox's own Connection header names is hop-by-hop, whatever its name.
    let hop_named: Vec<_> = connection_named(headers).collect();
    let kept: Vec<_> = ANSWER_HEADERS
        .iter()
        .filter(|name| !hop_named.contains(name))
        .flat_map(|name| {
            headers
                .get_all(name)
                .iter()
                .map(move |v| (name.clone(), v.clone()))
        })
        .collect();
    headers.clear();
    for (name, value) in kept {
        headers.append(name, value);
    }
}

/// Whether the answer holds the key of `key` (the `Authorization` value sent): as it is,
/// JSON-escaped (`\/`, `\"`, `\\`, `\u0026`) or percent-encoded (hex digits in either case), the
/// forms an upstream that echoes a request writes it in. Matched where it lies, without a
/// copy of the key in another form (the key lives only in wiped buffers). A key too short
/// to tell from ordinary text is not looked for.
fn carries(headers: &HeaderMap, body: &[u8], key: &[u8]) -> bool {
    let secret = key.strip_prefix(b"ApiKey ").unwrap_or(key);
    if secret.len() < 8 {
        return false;
    }
    let holds = |text: &[u8]| {
        memchr::memmem::find(text, secret).is_some()
            // Written otherwise, a `\` or a `%` stands for some byte of it.
            || (memchr::memchr2(b'\\', b'%', text).is_some()
                && (0..text.len()).any(|at| written_at(&text[at..], secret)))
    };
    holds(body) || headers.values().any(|v| holds(v.as_bytes()))
}

/// Whether `text` begins with `secret`, each byte of it written as it is, escaped with a
/// backslash (`\&` or `\u0026`), or percent-encoded.
fn written_at(text: &[u8], secret: &[u8]) -> bool {
    let mut at = 0;
    for &b in secret {
        match text.get(at) {
            Some(&c) if c == b => at += 1,
            Some(b'\\') if text.get(at + 1) == Some(&b) => at += 2,
            // `\u0026`, as JSON writers that escape HTML's characters (Go, Rails) write `&`.
            Some(b'\\')
                if text.get(at + 1) == Some(&b'u')
                    && text.get(at + 2..at + 4) == Some(b"00")
                    && text.get(at + 4..at + 6).and_then(hex_byte) == Some(b) =>
            {
                at += 6
            }
            Some(b'%') if text.get(at + 1..at + 3).and_then(hex_byte) == Some(b) => at += 3,
            _ => return false,
        }
    }
    true
}

/// Two hex digits, either case.
fn hex_byte(digits: &[u8]) -> Option<u8> {
    let digit = |d: u8| (d as char).to_digit(16);
    Some((digit(digits[0])? * 16 + digit(digits[1])?) as u8)
}

/// Why a reset answer's body could not be read whole, in a few words.
fn body_error(error: &(dyn std::error::Error + Send + Sync + 'static)) -> String {
    if error.is::<http_body_util::LengthLimitError>() {
        return format!("answer body over {} KiB", MAX_RESET_BODY / 1024);
    }
    let error: &(dyn std::error::Error + 'static) = error;
    let chain = std::iter::successors(Some(error), |&e| e.source());
    format!("answer body: {}", cause::upstream_error(chain))
}

/// Whether the answer's body is in a content coding (`gzip`, ...): `identity` is none.
fn coded(headers: &HeaderMap) -> bool {
    headers.get_all(CONTENT_ENCODING).iter().any(|coding| {
        coding.as_bytes().split(|&b| b == b',').any(|c| {
            !c.trim_ascii().is_empty() && !c.trim_ascii().eq_ignore_ascii_case(b"identity")
        })
    })
}

/// QuickBlox refusing the server key stops every reset email while uniform answers show
/// clients a success: said at once, then at most once a minute with the count since.
fn warn_key_refused() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static REFUSED: AtomicU64 = AtomicU64::new(0);
    static SAID_AT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let now = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
        + 1;
    REFUSED.fetch_add(1, Ordering::Relaxed);
    let said = SAID_AT.load(Ordering::Relaxed);
    if (said == 0 || now >= said + 60)
        && SAID_AT
            .compare_exchange(said, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let refused = REFUSED.swap(0, Ordering::Relaxed);
        tracing::error!(
            refused,
            "QuickBlox answers resets with 401: it refuses the server API key (upstream.api_key_env \
             or api_key_file), so no reset email is sent; under uniform answers clients still get 200"
        );
    }
}

/// Runs `say` the first time only: what QuickBlox's answers do once, they do to every
/// request.
fn once(said: &std::sync::atomic::AtomicBool, say: impl FnOnce()) {
    if !said.swap(true, std::sync::atomic::Ordering::Relaxed) {
        say();
    }
}

fn warn_once_key_reflected() {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    once(&SAID, || {
        tracing::error!(
            "QuickBlox's answer to a reset held the server API key: withheld, the client gets 502 \
             (said once)"
        );
    });
}

fn warn_once_coded() {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    once(&SAID, || {
        tracing::error!(
            "QuickBlox answered a reset in a content coding (Content-Encoding), which the gateway \
             cannot check for the API key: withheld, the client gets 502 (said once)"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_answer_headers_reach_the_client() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, "application/json".parse().unwrap());
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        headers.insert(http::header::SET_COOKIE, "s=1".parse().unwrap());
        headers.insert(http::header::LOCATION, "/x".parse().unwrap());
        keep_answer_headers(&mut headers);
        let mut names: Vec<_> = headers.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "retry-after"]);
    }

    #[test]
    fn the_key_is_found_in_the_body_or_a_header() {
        let key = b"ApiKey s3cr3t-key";
        assert!(carries(
            &HeaderMap::new(),
            b"{\"echo\":\"s3cr3t-key\"}",
            key
        ));
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, "text/s3cr3t-key".parse().unwrap());
        assert!(carries(&headers, b"", key));
        assert!(!carries(&HeaderMap::new(), b"{\"errors\":[]}", key));
    }

    #[test]
    fn the_key_is_found_json_escaped_or_percent_encoded() {
        let key = b"ApiKey QBKEY/super+secret=0123";
        for body in [
            &b"{\"auth\":\"ApiKey QBKEY\\/super+secret=0123\"}"[..],
            b"auth=ApiKey%20QBKEY%2Fsuper%2Bsecret%3D0123",
            b"auth=ApiKey%20QBKEY%2fsuper%2bsecret%3d0123",
        ] {
            assert!(
                carries(&HeaderMap::new(), body, key),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Mixed, and the escapes JSON writes for a quote and a backslash.
        let key = b"ApiKey k3y/\"q\\uote+d";
        for body in [
            &b"k3y\\/\\\"q\\\\uote+d"[..],
            b"k3y%2F%22q%5cuote%2Bd",
            b"x=k3y%2f\\\"q%5Cuote+d;",
        ] {
            assert!(
                carries(&HeaderMap::new(), body, key),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Every byte, or the ones Go's and Rails's JSON escape, as `\u00XX` in either case.
        let key = b"ApiKey QBKEY&secret<value>2026";
        for body in [
            &b"{\"auth\":\"QBKEY\\u0026secret\\u003cvalue\\u003E2026\"}"[..],
            b"\\u0051\\u0042\\u004b\\u0045\\u0059\\u0026secret<value>2026",
        ] {
            assert!(
                carries(&HeaderMap::new(), body, key),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(!carries(
            &HeaderMap::new(),
            b"QBKEY\\u0027secret<value>2026",
            key
        ));
        assert!(!carries(&HeaderMap::new(), b"QBKEY\\u00", key));
        let key = b"ApiKey k3y/\"q\\uote+d";
        assert!(!carries(&HeaderMap::new(), b"k3y%2F%22q%5cuote%2B", key));
        assert!(!carries(&HeaderMap::new(), b"%%\\\\%4", key));
    }

    #[test]
    fn a_coded_answer_is_told_apart_from_identity() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_ENCODING, value.parse().unwrap());
            coded(&headers)
        };
        assert!(!coded(&HeaderMap::new()));
        assert!(!with("identity"));
        assert!(!with("Identity"));
        assert!(with("gzip"));
        assert!(with("identity, br"));
    }
}
