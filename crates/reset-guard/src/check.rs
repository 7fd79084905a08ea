//! The guard's decision for one request: SPEC §3 steps 1 to 4, cheapest check first.

use http::header::{AUTHORIZATION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Method, Request};
use http_body::Body;
use percent_encoding::percent_decode_str;

use crate::auth::{presented_token, QB_TOKEN};
use crate::client_ip::{ClientIp, PeerAddr};
use crate::config::OtherRoutes;
use crate::context::GuardedRequest;
use crate::email::{Email, EmailKey};
use crate::layer::GuardState;
use crate::query::email_param;
use crate::rejection::Rejection;

/// What to do with a request that was not rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A checked reset request, swapped to the server key.
    Guarded,
    /// Another path under `other_routes: forward`.
    PassThrough,
}

pub(crate) fn check<B: Body>(
    state: &GuardState,
    request: &mut Request<B>,
) -> Result<Verdict, Rejection> {
    let settings = &state.settings;
    let path = request.uri().path();
    if path != settings.path {
        // A spelling QuickBlox might route to the reset action (`/Users//password/reset%2Ejson`)
        // would slip past every check if forwarded, so it is never forwarded.
        if settings.other_routes == OtherRoutes::Reject || resembles(path, &settings.path) {
            return Err(Rejection::NotFound);
        }
        return Ok(Verdict::PassThrough);
    }
    if request.method() != Method::GET {
        return Err(Rejection::MethodNotAllowed);
    }
    if has_body(request) {
        return Err(Rejection::BodyOnGet);
    }
    let client_ip = match request.extensions().get::<PeerAddr>() {
        Some(peer) => ClientIp::resolve(peer.0.ip(), request.headers(), &settings.trusted_proxies),
        None => ClientIp::UNKNOWN,
    };
    let token = presented_token(request.headers())?;
    let client_id = settings
        .clients
        .identify(token)
        .ok_or(Rejection::UnknownClient)?
        .clone();
    let raw = email_param(request.uri().query())?;
    let email = Email::parse(&raw, settings.email).map_err(Rejection::EmailInvalid)?;
    let email_key = EmailKey::new(&email, settings.email_key);

    let headers = request.headers_mut();
    headers.remove(QB_TOKEN);
    headers.insert(AUTHORIZATION, state.api_key.authorization().clone());
    request.extensions_mut().insert(GuardedRequest {
        client_id,
        client_ip,
        email,
        email_key,
    });
    Ok(Verdict::Guarded)
}

/// Content-Length > 0, any Transfer-Encoding, or (HTTP/2) a body stream that is not empty.
fn has_body<B: Body>(request: &Request<B>) -> bool {
    let headers = request.headers();
    if headers.contains_key(TRANSFER_ENCODING) {
        return true;
    }
    for value in headers.get_all(CONTENT_LENGTH) {
        match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(0) => {}
            _ => return true,
        }
    }
    let body = request.body();
    !body.is_end_stream() && body.size_hint().exact() != Some(0)
}

/// Whether `path` could name the same route as `guarded` once decoded, case-folded,
/// with dot segments, doubled or trailing slashes and the format suffix removed.
fn resembles(path: &str, guarded: &str) -> bool {
    normalise(path) == normalise(guarded)
}

fn normalise(path: &str) -> String {
    let decoded = percent_decode_str(path).decode_utf8_lossy().to_lowercase();
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    if let Some(last) = segments.last_mut() {
        if let Some(dot) = last.find('.') {
            *last = &last[..dot];
        }
    }
    segments.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookalike_paths_resemble_the_guarded_one() {
        let guarded = "/users/password/reset.json";
        for path in [
            "/users/password/reset%2Ejson",
            "//users/password/reset.json",
            "/users/password/reset.json/",
            "/Users/Password/Reset.JSON",
            "/users/./password/reset.json",
            "/users/x/../password/reset.json",
            "/users/password/reset",
            "/users/password/reset.xml",
            "/users%2Fpassword/reset.json",
        ] {
            assert!(resembles(path, guarded), "{path}");
        }
        for path in [
            "/users.json",
            "/users/password/resets.json",
            "/session.json",
        ] {
            assert!(!resembles(path, guarded), "{path}");
        }
    }
}
