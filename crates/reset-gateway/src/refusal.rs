//! Answers the gateway gives on its own, outside the guard: requests a careful HTTP server
//! refuses before reading what they ask, a client's broken request body, and exchanges
//! with QuickBlox that failed. They use the guard's error envelope and content type.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};

/// Why the gateway answered itself; the access log and metrics learn it from the upstream
/// exchange (or the handler's own timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A request with more than one Host header or one that names no host, or an
    /// HTTP/1.1 request without one (RFC 9112 §3.2).
    #[error("request without exactly one valid Host header")]
    HostRequired,
    /// A request target longer than `server.max_uri_bytes`.
    #[error("request target too long")]
    TargetTooLong,
    /// On a forwarded route, a request no API proxy passes on: `CONNECT` (a tunnel),
    /// `TRACE` (its answer echoes the request's cookies and credentials), an asterisk-form
    /// target (`OPTIONS *`) or an authority-form one (`GET host:80`), which would reach
    /// QuickBlox as something else.
    #[error("CONNECT, TRACE or asterisk-form request on a forwarded route")]
    NotProxied,
    /// On a forwarded route, a request body sent with a transfer coding other than
    /// `chunked` (`gzip, chunked`): re-framed for QuickBlox, its coding would be lost and
    /// the bytes passed on as if plain (nginx answers 501 too).
    #[error("request body in a transfer coding other than chunked")]
    TransferCodingUnsupported,
    /// A forwarded request's body was broken by the client (bad chunk framing, cut short
    /// before its length): the client's fault, not QuickBlox's.
    #[error("request body malformed or cut short")]
    ClientBodyInvalid,
    /// A forwarded request's body stopped arriving before QuickBlox could answer.
    #[error("request body not received in time")]
    ClientBodyTimeout,
    /// A CORS preflight from an origin not in `server.cors.allow_origins`: a browser would
    /// refuse the call anyway; the 403 says why to whoever reads it.
    #[error("CORS preflight from an origin not allowed")]
    OriginNotAllowed,
    /// QuickBlox could not be reached or answered badly.
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    /// QuickBlox did not answer in time.
    #[error("upstream timed out")]
    UpstreamTimeout,
}

impl Refusal {
    /// Every label [`outcome`](Refusal::outcome) gives, for counters made ahead of use.
    pub const OUTCOMES: [&'static str; 9] = [
        "host_required",
        "target_too_long",
        "not_proxied",
        "transfer_coding_unsupported",
        "client_body_invalid",
        "client_body_timeout",
        "origin_refused",
        "upstream_unavailable",
        "upstream_timeout",
    ];

    /// The HTTP status of the answer.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::HostRequired | Refusal::ClientBodyInvalid | Refusal::NotProxied => {
                StatusCode::BAD_REQUEST
            }
            Refusal::TargetTooLong => StatusCode::URI_TOO_LONG,
            Refusal::TransferCodingUnsupported => StatusCode::NOT_IMPLEMENTED,
            Refusal::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::OriginNotAllowed => StatusCode::FORBIDDEN,
            Refusal::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short label for logs and metrics.
    pub fn outcome(self) -> &'static str {
        let [host, target, not_proxied, coding, body, body_timeout, origin, unavailable, timeout] =
            Self::OUTCOMES;
        match self {
            Refusal::HostRequired => host,
            Refusal::TargetTooLong => target,
            Refusal::NotProxied => not_proxied,
            Refusal::TransferCodingUnsupported => coding,
            Refusal::ClientBodyInvalid => body,
            Refusal::ClientBodyTimeout => body_timeout,
            Refusal::OriginNotAllowed => origin,
            Refusal::UpstreamUnavailable => unavailable,
            Refusal::UpstreamTimeout => timeout,
        }
    }

    /// The QuickBlox-style error envelope.
    pub fn body(self) -> &'static str {
        match self {
            Refusal::HostRequired => {
                r#"{"errors":{"base":["Exactly one Host header is required"]}}"#
            }
            Refusal::TargetTooLong => r#"{"errors":{"base":["Request target too long"]}}"#,
            Refusal::NotProxied => {
                r#"{"errors":{"base":["CONNECT, TRACE and asterisk-form requests are not proxied"]}}"#
            }
            Refusal::TransferCodingUnsupported => {
                r#"{"errors":{"base":["Transfer codings other than chunked are not supported"]}}"#
            }
            Refusal::ClientBodyInvalid => {
                r#"{"errors":{"base":["Request body is malformed or cut short"]}}"#
            }
            Refusal::ClientBodyTimeout => {
                r#"{"errors":{"base":["Request body not received in time"]}}"#
            }
            Refusal::OriginNotAllowed => r#"{"errors":{"base":["Origin not allowed"]}}"#,
            Refusal::UpstreamUnavailable | Refusal::UpstreamTimeout => {
                r#"{"errors":{"base":["Upstream unavailable"]}}"#
            }
        }
    }

    /// The full answer.
    pub fn to_response(self) -> Response<Bytes> {
        let body = self.body();
        let mut response = Response::new(Bytes::from_static(body.as_bytes()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Refusal; 9] = [
        Refusal::HostRequired,
        Refusal::TargetTooLong,
        Refusal::NotProxied,
        Refusal::TransferCodingUnsupported,
        Refusal::ClientBodyInvalid,
        Refusal::ClientBodyTimeout,
        Refusal::OriginNotAllowed,
        Refusal::UpstreamUnavailable,
        Refusal::UpstreamTimeout,
    ];

    #[test]
    fn every_outcome_is_listed_and_every_body_is_an_envelope() {
        for refusal in ALL {
            assert!(
                Refusal::OUTCOMES.contains(&refusal.outcome()),
                "{refusal:?}"
            );
            let response = refusal.to_response();
            let body = std::str::from_utf8(response.body()).unwrap();
            assert!(body.starts_with(r#"{"errors":{"base":[""#), "{body}");
        }
    }
}
