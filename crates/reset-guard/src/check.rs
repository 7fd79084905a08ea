//! The guard's decision for one request: SPEC §3 steps 1 to 4, cheapest check first,
//! each rate limit charged only once the steps before it passed.

use http::header::{AUTHORIZATION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Method, Request};
use http_body::Body;
use percent_encoding::percent_decode_str;

use crate::auth::{presented_token, QB_TOKEN};
use crate::client_ip::{ClientIp, PeerAddr};
use crate::config::OtherRoutes;
use crate::context::GuardedRequest;
use crate::email::{canonical_chars, Email};
use crate::layer::{GuardState, Shared};
use crate::limit::{Domain, LimitGroup, Standing};
use crate::query::email_param;
use crate::rejection::Rejection;

/// What to do with a request that was not rejected outright.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// A checked reset, swapped to the server key; the tightest quota's standing.
    Guarded(Option<Standing>),
    /// A per-email denial under uniform answers: answered like a success, never forwarded.
    Silenced(Rejection, Box<GuardedRequest>),
    /// Another path under `other_routes: forward`.
    PassThrough,
}

pub(crate) fn check<B: Body>(
    shared: &Shared,
    state: &GuardState,
    request: &mut Request<B>,
) -> Result<Verdict, Rejection> {
    let settings = &state.settings;
    let limits = &settings.limits;
    let limiter = &state.limiter;
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

    // Step 2: who is asking, and the per-IP limit, charged for valid and invalid alike.
    let client_ip = match request.extensions().get::<PeerAddr>() {
        Some(peer) => ClientIp::resolve(peer.0.ip(), request.headers(), &settings.trusted_proxies),
        None => ClientIp::UNKNOWN,
    };
    let now = limiter.now();
    let mut standing = None;
    if !limits.is_exempt(client_ip.ip()) {
        let key = limits.ip_key(client_ip.ip(), &shared.hasher);
        standing = limiter
            .check(LimitGroup::PerIp, key, now)
            .map_err(Rejection::RateLimited)?;
    }

    // Step 3: exactly one known credential, then the per-client limit.
    let token = presented_token(request.headers())?;
    let client_id = settings
        .clients
        .identify(token)
        .ok_or(Rejection::UnknownClient)?
        .clone();
    let key = shared
        .hasher
        .hash(Domain::Client, client_id.as_str().as_bytes());
    standing = tighter(
        standing,
        limiter
            .check(LimitGroup::PerClient, key, now)
            .map_err(Rejection::RateLimited)?,
    );

    // Step 4: one valid address, then the per-email and global limits.
    let raw = email_param(request.uri().query())?;
    let email = Email::parse(&raw, settings.email).map_err(Rejection::EmailInvalid)?;
    let email_hash = shared.hasher.hash_chars(Domain::Email, |sink| {
        canonical_chars(&email, limits.email_key, sink)
    });
    let guarded = GuardedRequest {
        client_id,
        client_ip,
        email,
        email_hash,
    };
    match limiter.check(LimitGroup::PerEmail, email_hash, now) {
        Ok(s) => standing = tighter(standing, s),
        Err(denial) if settings.uniform => {
            return Ok(Verdict::Silenced(
                Rejection::RateLimited(denial),
                Box::new(guarded),
            ));
        }
        Err(denial) => return Err(Rejection::RateLimited(denial)),
    }
    standing = tighter(
        standing,
        limiter
            .check(LimitGroup::Global, 0, now)
            .map_err(Rejection::RateLimited)?,
    );

    let headers = request.headers_mut();
    headers.remove(QB_TOKEN);
    headers.insert(AUTHORIZATION, state.api_key.authorization().clone());
    request.extensions_mut().insert(guarded);
    Ok(Verdict::Guarded(standing))
}

fn tighter(current: Option<Standing>, next: Option<Standing>) -> Option<Standing> {
    match next {
        Some(next) => Some(next.tighter(current)),
        None => current,
    }
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
