//! Logging setup and the one-line-per-request access log.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::time::Duration;

use http::StatusCode;
use reset_guard::{GuardedRequest, Rejection, UpstreamStatus};

use crate::refusal::Refusal;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use crate::upstream::UpstreamExchange;

/// Installs the global subscriber; `RUST_LOG` overrides `log.level`. Calling it again
/// (tests) is harmless.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    // Colour codes only for a person at a terminal: in a file or a log pipeline they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// A short tag for an address: the top 48 bits of its keyed limit-key hash. Enough to
/// follow one address through the logs; without the key, not enough to test a guess.
pub fn email_tag(guarded: &GuardedRequest) -> String {
    format!("{:012x}", guarded.email_hash() >> 16)
}

/// What the access log says about one request.
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub peer: IpAddr,
    pub status: StatusCode,
    pub duration: Duration,
    pub guarded: Option<&'a GuardedRequest>,
    pub rejection: Option<&'a Rejection>,
    pub refusal: Option<Refusal>,
    pub upstream: Option<&'a UpstreamExchange>,
    pub uniform: Option<&'a UpstreamStatus>,
    pub include_email: bool,
}

impl AccessRecord<'_> {
    /// The outcomes of requests the guard did not answer itself: a checked reset, and
    /// another route under `other_routes: forward`.
    pub const FORWARD_OUTCOMES: [&'static str; 2] = ["forwarded", "passed_through"];

    /// The outcome label for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        let [forwarded, passed_through] = Self::FORWARD_OUTCOMES;
        match (self.refusal, self.rejection, self.guarded) {
            (Some(refusal), _, _) => refusal.outcome(),
            (None, Some(rejection), _) => rejection.outcome(),
            (None, None, Some(_)) => forwarded,
            (None, None, None) => passed_through,
        }
    }

    /// Emits the line.
    pub fn emit(&self) {
        let outcome = self.outcome();
        let limit = match self.rejection {
            Some(Rejection::RateLimited(denial)) => Some(denial.group.name()),
            _ => None,
        };
        let upstream_status = self
            .uniform
            .map(|u| u.0.as_u16())
            .or_else(|| self.upstream.and_then(|u| u.status).map(|s| s.as_u16()));
        let client_ip = self.guarded.map_or(self.peer, |g| g.client_ip());
        tracing::info!(
            target: "access",
            request_id = self.request_id,
            client_id = self.guarded.map(|g| g.client_id()),
            client_ip = %client_ip,
            email_hash = self.guarded.map(email_tag),
            email = self.guarded.filter(|_| self.include_email).map(|g| g.email()),
            outcome,
            limit,
            status = self.status.as_u16(),
            upstream_status,
            upstream_ms = self.upstream.map(|u| millis(u.duration)),
            duration_ms = millis(self.duration),
        );
    }
}

/// Milliseconds to the microsecond: finer is clock noise, and the plain `f64` printed
/// 0.030154999999999998.
fn millis(duration: Duration) -> f64 {
    let micros = u64::try_from((duration.as_nanos() + 500) / 1000).unwrap_or(u64::MAX);
    // Correctly rounded, so it prints as its shortest form: at most three decimals.
    micros as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_keep_three_decimals() {
        for (duration, printed) in [
            (Duration::from_nanos(30_154_999), "30.155"),
            (Duration::from_nanos(30_155), "0.03"),
            (Duration::from_nanos(499), "0"),
            (Duration::from_nanos(500), "0.001"),
            (Duration::from_micros(1), "0.001"),
            (Duration::from_secs(8), "8000"),
        ] {
            assert_eq!(format!("{}", millis(duration)), printed);
        }
    }
}
