//! The guard's decision for one request: steps 1 to 4 of ARCHITECTURE.md, "The request's
//! path", cheapest check first, each rate limit charged only once the steps before it
//! passed.

use http::header::{AUTHORIZATION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Method, Request};
use http_body::Body;
use percent_encoding::percent_decode_str;

use crate::auth::{presented_token, QB_TOKEN};
use crate::client_ip::{ClientIp, PeerAddr};
use crate::config::OtherRoutes;
use crate::context::{Attribution, GuardedRequest};
use crate::email::{canonical_chars, Email};
use crate::limit::{Decision, Domain, LimitGroup, Limiter, Standing};
use crate::query::email_param;
use crate::rejection::Rejection;
use crate::state::{GuardCore, GuardState};

/// What the checks alone (no limiter yet) make of a request.
#[derive(Debug)]
// Lives on the stack for one call; boxing the plan would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Inspection {
    /// Refused before any limit applies (route, method, body).
    Answer(Rejection),
    /// Another path under `other_routes: forward`.
    PassThrough,
    /// A reset without a peer address, when the layer was not told to allow that.
    MissingPeer,
    /// The limits to charge, in order, and what follows if they all admit.
    Plan(Plan),
}

/// The limits a request is charged to, in request order, and its fate once they admit.
#[derive(Debug)]
pub(crate) struct Plan {
    charges: [(LimitGroup, u64); 4],
    len: usize,
    then: Then,
    /// Set when the limits were charged during the inspection (the memory store).
    pub(crate) decided: Option<Decision>,
    standing: Option<Standing>,
    /// What the charges were keyed on, for the access log.
    attribution: Attribution,
}

#[derive(Debug)]
enum Then {
    /// A later check failed: the limits before it are still charged.
    Reject(Rejection),
    /// Every check passed.
    Forward(Box<GuardedRequest>),
}

impl Plan {
    fn new(then: Then, client_ip: ClientIp) -> Self {
        Plan {
            charges: [(LimitGroup::Global, 0); 4],
            len: 0,
            then,
            decided: None,
            standing: None,
            attribution: Attribution {
                client_ip: client_ip.ip(),
                client_id: None,
                email_hash: None,
            },
        }
    }

    /// Adds a charge; with `eager`, charges it at once and says whether it was admitted,
    /// so a denied request goes no further (a cheap 429 under a flood).
    fn charge(&mut self, group: LimitGroup, key: u64, eager: Option<(&Limiter, u64)>) -> bool {
        self.charges[self.len] = (group, key);
        self.len += 1;
        let Some((limiter, now)) = eager else {
            return true;
        };
        match limiter.check(group, key, now) {
            Ok(Some(standing)) => {
                self.standing = Some(standing.tighter(self.standing));
                true
            }
            Ok(None) => true,
            Err(denial) => {
                self.decided = Some(Decision::Denied(self.len - 1, denial));
                false
            }
        }
    }

    /// What an eager inspection decided: admitted unless a charge was denied.
    pub(crate) fn eager_decision(&self) -> Decision {
        self.decided.unwrap_or(Decision::Admitted(self.standing))
    }

    /// The `(group, key)` pairs to charge, in order.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn charges(&self) -> &[(LimitGroup, u64)] {
        &self.charges[..self.len]
    }
}

/// The final word on a request.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// A checked reset, swapped to the server key; the tightest quota's standing.
    Guarded(Option<Standing>),
    /// A per-email denial under uniform answers: answered like a success, never forwarded.
    Silenced(Rejection, Box<GuardedRequest>),
    /// Answered by the guard, and what its limits were keyed on.
    Rejected(Rejection, Attribution),
}

/// Steps 1 to 4 (route, client IP, credential, email; see the module docs): which limits
/// apply to this request, in order, and what follows.
/// With `eager` (the memory store) each limit is charged as the request reaches it and a
/// denial ends the inspection; without (Redis), the plan is decided in one round trip
/// afterwards, with the same outcome.
pub(crate) fn inspect<B: Body>(
    core: &GuardCore,
    state: &GuardState,
    request: &Request<B>,
    eager: bool,
) -> Inspection {
    let eager = eager.then(|| (&state.limiter, state.limiter.now()));
    let settings = &state.settings;
    let limits = &settings.limits;
    let path = request.uri().path();
    if path != settings.path {
        // A spelling QuickBlox might route to the reset action (`/Users//password/reset%2Ejson`)
        // would slip past every check if forwarded, so it is never forwarded.
        if settings.other_routes == OtherRoutes::Reject || resembles(path, &settings.path) {
            return Inspection::Answer(Rejection::NotFound);
        }
        return Inspection::PassThrough;
    }
    if request.method() != Method::GET {
        return Inspection::Answer(Rejection::MethodNotAllowed);
    }
    if has_body(request) {
        return Inspection::Answer(Rejection::BodyOnGet);
    }

    // Step 2: who is asking; the per-IP limit applies to valid and invalid requests alike.
    let client_ip = match request.extensions().get::<PeerAddr>() {
        Some(peer) => ClientIp::resolve(peer.0.ip(), request.headers(), &settings.trusted_proxies),
        None if core.peer_optional => ClientIp::UNKNOWN,
        None => return Inspection::MissingPeer,
    };
    let mut plan = Plan::new(Then::Reject(Rejection::NotFound), client_ip);
    if !limits.is_exempt(client_ip.ip())
        && !plan.charge(
            LimitGroup::PerIp,
            limits.ip_key(client_ip.ip(), &core.hasher),
            eager,
        )
    {
        return Inspection::Plan(plan);
    }

    // Step 3: exactly one known credential, then the per-client limit.
    let client_id = match presented_token(request.headers()).and_then(|token| {
        settings
            .clients
            .identify(token)
            .ok_or(Rejection::UnknownClient)
    }) {
        Ok(id) => id.clone(),
        Err(rejection) => {
            return Inspection::Plan(Plan {
                then: Then::Reject(rejection),
                ..plan
            })
        }
    };
    let client_key = core
        .hasher
        .hash(Domain::Client, client_id.as_str().as_bytes());
    plan.attribution.client_id = Some(client_id.clone());
    if !plan.charge(LimitGroup::PerClient, client_key, eager) {
        return Inspection::Plan(plan);
    }

    // Step 4: one valid address, then the per-email and global limits.
    let email = match email_param(request.uri().query())
        .and_then(|raw| Email::parse(&raw, settings.email).map_err(Rejection::EmailInvalid))
    {
        Ok(email) => email,
        Err(rejection) => {
            return Inspection::Plan(Plan {
                then: Then::Reject(rejection),
                ..plan
            })
        }
    };
    let email_hash = core.hasher.hash_chars(Domain::Email, |sink| {
        canonical_chars(&email, settings.email_key, sink)
    });
    plan.attribution.email_hash = Some(email_hash);
    plan.then = Then::Forward(Box::new(GuardedRequest {
        client_id,
        client_ip,
        email,
        email_hash,
        uniform: settings.uniform,
        limits_skipped: false,
    }));
    if plan.charge(LimitGroup::PerEmail, email_hash, eager) {
        plan.charge(LimitGroup::Global, 0, eager);
    }
    Inspection::Plan(plan)
}

/// Applies the store's decision: a denial answers 429 (or, for the per-email limit under
/// uniform answers, a silent success); otherwise the plan's own outcome, and for a
/// forwarded reset the swap of the client token for the server key.
pub(crate) fn conclude<B>(
    state: &GuardState,
    request: &mut Request<B>,
    plan: Plan,
    decision: Decision,
) -> Verdict {
    let attribution = plan.attribution;
    match (decision, plan.then) {
        (Decision::Unavailable, _) => Verdict::Rejected(Rejection::LimiterUnavailable, attribution),
        (Decision::Denied(_, denial), Then::Forward(guarded))
            if denial.group == LimitGroup::PerEmail && state.settings.uniform =>
        {
            Verdict::Silenced(Rejection::RateLimited(denial), guarded)
        }
        (Decision::Denied(_, denial), _) => {
            Verdict::Rejected(Rejection::RateLimited(denial), attribution)
        }
        (Decision::Admitted(_) | Decision::Unlimited, Then::Reject(rejection)) => {
            Verdict::Rejected(rejection, attribution)
        }
        (decision @ (Decision::Admitted(_) | Decision::Unlimited), Then::Forward(mut guarded)) => {
            let standing = match decision {
                Decision::Admitted(standing) => standing,
                _ => {
                    guarded.limits_skipped = true;
                    None
                }
            };
            let headers = request.headers_mut();
            headers.remove(QB_TOKEN);
            headers.insert(AUTHORIZATION, state.api_key.authorization().clone());
            request.extensions_mut().insert(*guarded);
            Verdict::Guarded(standing)
        }
    }
}

/// Content-Length > 0, any Transfer-Encoding, a body known to hold bytes, or (HTTP/2 and
/// later) a body stream that is not empty. Over HTTP/1 the headers say whether there is a
/// body (RFC 9112 §6.3): a body type that cannot tell its size (a layer's wrapper, such as
/// tower-http's `RequestBodyTimeout`, or a stream) is no body unless they say so. A
/// `Content-Length: 0` says there is none over HTTP/2 too (the HTTP/2 server holds the
/// stream to it). Otherwise HTTP/2 tells an empty body by its stream's end, which such a
/// wrapper hides: it belongs inside the guard. (So does a layer that removes the framing
/// headers, as tower-http's `RequestDecompression` does.)
fn has_body<B: Body>(request: &Request<B>) -> bool {
    let headers = request.headers();
    if headers.contains_key(TRANSFER_ENCODING) {
        return true;
    }
    let mut declared_empty = false;
    for value in headers.get_all(CONTENT_LENGTH) {
        match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(0) => declared_empty = true,
            _ => return true,
        }
    }
    let body = request.body();
    if declared_empty {
        return body.size_hint().lower() > 0;
    }
    if request.version() < http::Version::HTTP_2 {
        return body.size_hint().lower() > 0;
    }
    !body.is_end_stream() && body.size_hint().exact() != Some(0)
}

/// Whether `path` could name the same route as `guarded` once decoded, case-folded,
/// with dot segments, doubled or trailing slashes, `;` parameters (which Java servers and
/// some proxies drop from each segment) and the format suffix removed.
fn resembles(path: &str, guarded: &str) -> bool {
    normalise(path) == normalise(guarded)
}

fn normalise(path: &str) -> String {
    let decoded = percent_decode_str(path).decode_utf8_lossy().to_lowercase();
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        let segment = segment.split(';').next().unwrap_or_default();
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
    // `reset/.json`: a format suffix standing as a segment of its own.
    if segments.last() == Some(&"") {
        segments.pop();
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
            "/users;x/password/reset.json",
            "/users/password/reset;.json",
            "/users/password%3Bjsessionid=1/reset.json",
            "/users/password/reset/.json",
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
