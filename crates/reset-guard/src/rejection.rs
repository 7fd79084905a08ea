//! Every answer the guard gives on its own, and the one place it becomes a response.

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};

use crate::email::EmailError;
use crate::limit::{Denial, LimitGroup, Quota};

/// Why a request was not forwarded. A rejection is a response, not an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The path is not guarded and `other_routes` is `reject`.
    #[error("no route for this path")]
    NotFound,
    /// Anything but GET on the guarded path.
    #[error("method not allowed on the reset path")]
    MethodNotAllowed,
    /// A GET with Content-Length > 0 or Transfer-Encoding.
    #[error("GET request carries a body")]
    BodyOnGet,
    /// Neither `QB-Token` nor `Authorization`.
    #[error("no QB-Token or Authorization header")]
    MissingCredentials,
    /// Both `QB-Token` and `Authorization`.
    #[error("both QB-Token and Authorization headers")]
    AmbiguousCredentials,
    /// One credential header given more than once.
    #[error("{0} header given more than once")]
    RepeatedCredential(&'static str),
    /// `Authorization` without the `ApiKey` scheme.
    #[error("Authorization scheme is not ApiKey")]
    BadScheme,
    /// A token that matches no configured client.
    #[error("unknown client token")]
    UnknownClient,
    /// No `email` query parameter, or an empty one.
    #[error("email is missing")]
    EmailMissing,
    /// `email` given more than once.
    #[error("email given more than once")]
    EmailRepeated,
    /// `email` is not valid percent-encoded UTF-8.
    #[error("email is not valid UTF-8")]
    EmailNotUtf8,
    /// `email` breaks one of the rules [`EmailError`] names.
    #[error("email is invalid: {0}")]
    EmailInvalid(EmailError),
    /// A rate limit denied the request.
    #[error("{} limit: {} per {:?}", .0.group.name(), .0.quota.requests, .0.quota.per)]
    RateLimited(Denial),
    /// The shared limiter (Redis) could not be asked and `on_error: deny` is set.
    #[error("rate limiter unavailable")]
    LimiterUnavailable,
    /// A request on the guarded path without a [`PeerAddr`](crate::PeerAddr): a wiring
    /// mistake in the host service (see [`ResetGuardBuilder::without_peer_address`](crate::ResetGuardBuilder::without_peer_address)),
    /// answered 500.
    #[error("no peer address: the host service does not insert PeerAddr")]
    MissingPeerAddress,
}

impl Rejection {
    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::NotFound => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::BodyOnGet
            | Rejection::AmbiguousCredentials
            | Rejection::RepeatedCredential(_)
            | Rejection::EmailRepeated => StatusCode::BAD_REQUEST,
            Rejection::MissingCredentials | Rejection::BadScheme | Rejection::UnknownClient => {
                StatusCode::UNAUTHORIZED
            }
            Rejection::EmailMissing | Rejection::EmailNotUtf8 | Rejection::EmailInvalid(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Rejection::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Rejection::LimiterUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::MissingPeerAddress => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Every label [`outcome`](Rejection::outcome) gives, for counters made ahead of use.
    pub const OUTCOMES: [&'static str; 13] = [
        "not_found",
        "method_not_allowed",
        "body_on_get",
        "missing_credentials",
        "ambiguous_credentials",
        "bad_scheme",
        "unknown_client",
        "email_missing",
        "email_repeated",
        "email_invalid",
        "rate_limited",
        "limiter_unavailable",
        "missing_peer_address",
    ];

    /// A short label for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Rejection::NotFound => "not_found",
            Rejection::MethodNotAllowed => "method_not_allowed",
            Rejection::BodyOnGet => "body_on_get",
            Rejection::MissingCredentials => "missing_credentials",
            Rejection::AmbiguousCredentials | Rejection::RepeatedCredential(_) => {
                "ambiguous_credentials"
            }
            Rejection::BadScheme => "bad_scheme",
            Rejection::UnknownClient => "unknown_client",
            Rejection::EmailMissing => "email_missing",
            Rejection::EmailRepeated => "email_repeated",
            Rejection::EmailNotUtf8 | Rejection::EmailInvalid(_) => "email_invalid",
            Rejection::RateLimited(_) => "rate_limited",
            Rejection::LimiterUnavailable => "limiter_unavailable",
            Rejection::MissingPeerAddress => "missing_peer_address",
        }
    }

    /// The QuickBlox-style error envelope.
    pub fn body(&self) -> &'static str {
        match self {
            Rejection::NotFound => r#"{"errors":{"base":["Not found"]}}"#,
            Rejection::MethodNotAllowed => r#"{"errors":{"base":["Method not allowed"]}}"#,
            Rejection::BodyOnGet => r#"{"errors":{"base":["GET request must not have a body"]}}"#,
            Rejection::MissingCredentials => {
                r#"{"errors":{"base":["QB-Token or Authorization header is required"]}}"#
            }
            Rejection::AmbiguousCredentials => {
                r#"{"errors":{"base":["Send exactly one of QB-Token and Authorization"]}}"#
            }
            Rejection::RepeatedCredential("QB-Token") => {
                r#"{"errors":{"base":["QB-Token header given more than once"]}}"#
            }
            Rejection::RepeatedCredential(_) => {
                r#"{"errors":{"base":["Authorization header given more than once"]}}"#
            }
            Rejection::BadScheme => {
                r#"{"errors":{"base":["Authorization scheme must be ApiKey"]}}"#
            }
            Rejection::UnknownClient => r#"{"errors":{"base":["Unknown client token"]}}"#,
            Rejection::EmailMissing => r#"{"errors":{"email":["is required"]}}"#,
            Rejection::EmailRepeated => {
                r#"{"errors":{"base":["email parameter given more than once"]}}"#
            }
            Rejection::EmailNotUtf8 | Rejection::EmailInvalid(_) => {
                r#"{"errors":{"email":["is invalid"]}}"#
            }
            Rejection::RateLimited(_) => {
                r#"{"errors":{"base":["Too many requests, retry later"]}}"#
            }
            Rejection::LimiterUnavailable => r#"{"errors":{"base":["Rate limiter unavailable"]}}"#,
            Rejection::MissingPeerAddress => r#"{"errors":{"base":["Internal server error"]}}"#,
        }
    }

    /// The full answer, with the JSON content type and, for 405, `Allow: GET`.
    pub fn to_response(&self) -> Response<Bytes> {
        let body = self.body();
        let mut response = Response::new(Bytes::from_static(body.as_bytes()));
        *response.status_mut() = self.status();
        // Room for these and the ones added on the way out (request id, security headers)
        // without growing the map.
        *response.headers_mut() = http::HeaderMap::with_capacity(12);
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, JSON.clone());
        headers.insert(CONTENT_LENGTH, content_length(body.len()));
        match self {
            Rejection::MethodNotAllowed => {
                headers.insert(ALLOW, HeaderValue::from_static("GET"));
            }
            Rejection::RateLimited(denial) => {
                let (state, retry_after) = state_fields(denial.group, denial.retry_after_secs());
                headers.insert(RETRY_AFTER, retry_after);
                headers.insert(RATELIMIT_POLICY, policy_field(denial.group, &denial.quota));
                headers.insert(RATELIMIT, state);
            }
            _ => {}
        }
        response
    }
}

/// `Content-Length` of an envelope: every one is 10 to 99 bytes long, so its length comes
/// from a static table rather than an allocation.
fn content_length(len: usize) -> HeaderValue {
    static TWO_DIGITS: [u8; 200] = {
        let mut table = [0u8; 200];
        let mut i = 0;
        while i < 100 {
            table[2 * i] = b'0' + (i / 10) as u8;
            table[2 * i + 1] = b'0' + (i % 10) as u8;
            i += 1;
        }
        table
    };
    if (10..100).contains(&len) {
        header_value(Bytes::from_static(&TWO_DIGITS[2 * len..2 * len + 2]))
    } else {
        HeaderValue::from(len)
    }
}

fn header_value(bytes: Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes).expect("ASCII digits and a fixed name")
}

/// `RateLimit` and `Retry-After` of a denial: the same for every denial by one group with
/// the same wait in whole seconds (a flood's denials within a second), so the last pair
/// made is kept per thread and shared.
fn state_fields(group: LimitGroup, retry: u64) -> (HeaderValue, HeaderValue) {
    type Made = Option<((LimitGroup, u64), HeaderValue, HeaderValue)>;
    thread_local! {
        static LAST: std::cell::RefCell<Made> = const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((made_for, state, retry_after)) if *made_for == (group, retry) => {
            (state.clone(), retry_after.clone())
        }
        _ => {
            let state = structured_field(group.name(), ("r", 0), ("t", retry));
            // `Retry-After` is the state's last number: one buffer for both.
            let digits = itoa::Buffer::new().format(retry).len();
            let retry_after = header_value(state.slice(state.len() - digits..));
            let state = header_value(state);
            *last = Some(((group, retry), state.clone(), retry_after.clone()));
            (state, retry_after)
        }
    })
}

/// `RateLimit-Policy` for `quota`: the same value for every denial of one quota, so the
/// last one made is kept per thread and shared (a flood is denied by one quota).
fn policy_field(group: LimitGroup, quota: &Quota) -> HeaderValue {
    type Made = Option<((LimitGroup, u32, u64), HeaderValue)>;
    thread_local! {
        static LAST: std::cell::RefCell<Made> = const { std::cell::RefCell::new(None) };
    }
    let key = (group, quota.requests, quota.window_secs());
    LAST.with_borrow_mut(|last| match last {
        Some((made_for, value)) if *made_for == key => value.clone(),
        _ => {
            let value = header_value(structured_field(
                group.name(),
                ("q", quota.requests.into()),
                ("w", quota.window_secs()),
            ));
            *last = Some((key, value.clone()));
            value
        }
    })
}

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The two structured fields for a quota: `"per_ip";q=20;w=60` and `"per_ip";r=0;t=42`.
pub fn rate_limit_fields(
    group: LimitGroup,
    quota: &Quota,
    remaining: u64,
    reset_secs: u64,
) -> (HeaderValue, HeaderValue) {
    (
        policy_field(group, quota),
        header_value(structured_field(
            group.name(),
            ("r", remaining),
            ("t", reset_secs),
        )),
    )
}

/// A structured field's bytes, kept inline: at most a group name and two 20-digit numbers.
struct Field {
    bytes: [u8; 64],
    len: usize,
}

impl Field {
    fn push(&mut self, bytes: &[u8]) {
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

impl AsRef<[u8]> for Field {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// `"name";a=1;b=2`, written without the formatting machinery: it is on every 429, where
/// `format!` cost more than the rest of the answer. One allocation, which the header
/// values cut from it share.
fn structured_field(name: &str, (a, a_value): (&str, u64), (b, b_value): (&str, u64)) -> Bytes {
    let mut digits = itoa::Buffer::new();
    let mut field = Field {
        bytes: [0; 64],
        len: 0,
    };
    field.push(b"\"");
    field.push(name.as_bytes());
    field.push(b"\";");
    field.push(a.as_bytes());
    field.push(b"=");
    field.push(digits.format(a_value).as_bytes());
    field.push(b";");
    field.push(b.as_bytes());
    field.push(b"=");
    field.push(digits.format(b_value).as_bytes());
    Bytes::from_owner(field)
}

/// `application/json; charset=utf-8`
pub(crate) static JSON: HeaderValue = HeaderValue::from_static("application/json; charset=utf-8");

/// The answer to a reset the guard vouches for without revealing anything: 200 and an
/// empty body, identical whether or not the account exists.
pub fn uniform_success() -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    set_uniform_headers(response.headers_mut());
    response
}

/// The headers of a uniform answer: its length, and nothing that could differ.
pub(crate) fn set_uniform_headers(headers: &mut http::HeaderMap) {
    headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rejection of each kind.
    fn every_kind() -> Vec<Rejection> {
        let quota = crate::config::QuotaConfig {
            requests: 1,
            per: crate::duration::ConfigDuration::from_secs(60),
            burst: None,
            shadow: false,
        }
        .validate()
        .unwrap();
        let mut all = vec![
            Rejection::NotFound,
            Rejection::MethodNotAllowed,
            Rejection::BodyOnGet,
            Rejection::MissingCredentials,
            Rejection::AmbiguousCredentials,
            Rejection::RepeatedCredential("QB-Token"),
            Rejection::RepeatedCredential("Authorization"),
            Rejection::BadScheme,
            Rejection::UnknownClient,
            Rejection::EmailMissing,
            Rejection::EmailRepeated,
            Rejection::EmailNotUtf8,
            Rejection::EmailInvalid(EmailError::AtSign),
            Rejection::LimiterUnavailable,
        ];
        all.push(Rejection::RateLimited(crate::limit::Denial {
            group: LimitGroup::PerIp,
            quota,
            retry_after: std::time::Duration::from_secs(1),
        }));
        all
    }

    #[test]
    fn a_denial_names_its_quota_to_the_millisecond() {
        let quota = |per: &str| {
            crate::config::GuardConfig::from_yaml(&format!(
                "clients: [{{ id: a, token_sha256: {} }}]\nlimits: {{ per_ip: [{{ requests: 5, per: {per} }}] }}\n",
                "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
            ))
            .unwrap()
            .validate()
            .unwrap()
            .quotas(LimitGroup::PerIp)[0]
        };
        for (per, shown) in [("500ms", "5 per 500ms"), ("1h", "5 per 3600s")] {
            let denied = Rejection::RateLimited(crate::limit::Denial {
                group: LimitGroup::PerIp,
                quota: quota(per),
                retry_after: std::time::Duration::from_millis(100),
            });
            assert_eq!(denied.to_string(), format!("per_ip limit: {shown}"));
        }
    }

    #[test]
    fn every_outcome_is_listed() {
        for rejection in every_kind() {
            assert!(
                Rejection::OUTCOMES.contains(&rejection.outcome()),
                "{rejection:?}"
            );
        }
    }

    #[test]
    fn a_denial_carries_its_retry_and_rate_limit_fields() {
        for rejection in every_kind() {
            let response = rejection.to_response();
            let length = response.headers()[CONTENT_LENGTH].to_str().unwrap();
            assert_eq!(length, response.body().len().to_string());
        }
        let quota = Quota::new(20, std::time::Duration::from_secs(60), None, false).unwrap();
        for (retry_after, expected) in [(1, "1"), (42, "42"), (3600, "3600")] {
            let denial = Rejection::RateLimited(crate::limit::Denial {
                group: LimitGroup::PerClient,
                quota,
                retry_after: std::time::Duration::from_millis(retry_after * 1000 - 1),
            });
            let response = denial.to_response();
            let headers = response.headers();
            assert_eq!(headers[RETRY_AFTER], expected);
            assert_eq!(headers[RATELIMIT_POLICY], "\"per_client\";q=20;w=60");
            assert_eq!(
                headers[RATELIMIT],
                format!("\"per_client\";r=0;t={expected}").as_str()
            );
        }
        let other = Quota::new(3, std::time::Duration::from_secs(3600), None, false).unwrap();
        let (policy, state) = rate_limit_fields(LimitGroup::PerEmail, &other, 2, 1200);
        assert_eq!(policy, "\"per_email\";q=3;w=3600");
        assert_eq!(state, "\"per_email\";r=2;t=1200");
        let (policy, _) = rate_limit_fields(LimitGroup::PerClient, &quota, 19, 3);
        assert_eq!(policy, "\"per_client\";q=20;w=60");
    }

    #[test]
    fn bodies_are_json_envelopes() {
        for rejection in every_kind() {
            let response = rejection.to_response();
            let body = std::str::from_utf8(response.body()).unwrap();
            assert!(body.starts_with(r#"{"errors":{""#), "{body}");
            assert!(body.ends_with("\"]}}"), "{body}");
            assert_eq!(response.headers()[CONTENT_TYPE], JSON);
        }
        assert_eq!(
            Rejection::MethodNotAllowed.to_response().headers()[ALLOW],
            "GET"
        );
    }
}
