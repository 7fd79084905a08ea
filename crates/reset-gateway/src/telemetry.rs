//! Logging setup and the one-line-per-request access log.
//!
//! The access log is also the input of `reset-gateway simulate` (`simulate/reader.rs`):
//! each line of a request that reached the limits says when it arrived (`received_at`,
//! RFC 3339 to the nanosecond), that it did (`guarded`), and what each limit group was
//! keyed on: `client_ip` as the per-IP limit resolved it, `client_id` once the credential
//! was known, `email_hash` once the address was valid.
//!
//! `sink` keeps logging off the request path; `fold` and `denials` fold repeated denials
//! into summary lines (`log.denials: summarize`).

mod denials;
mod fold;
mod sink;

pub use denials::DenialLog;
pub use fold::Denial;
pub use sink::{dropped_lines, LogSink};

use std::io::IsTerminal;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use reset_guard::internals::Attribution;
use reset_guard::{GuardedRequest, Rejection, UpstreamStatus};

use crate::refusal::Refusal;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use crate::upstream::UpstreamExchange;

/// Installs the global subscriber, writing to stderr through the non-blocking sink
/// (`sink.rs`); `RUST_LOG` overrides `log.level`. Keep the returned sink until exit: its
/// drop writes out what is queued. Calling it again (tests) is harmless and returns `None`.
pub fn init(log: &LogConfig) -> Option<LogSink> {
    let (writer, sink) = sink::install(log.format, log.queue_lines)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    // Colour codes only for a person at a terminal: in a file or a log pipeline they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Some(sink)
}

/// How an address appears in the logs: its per-email limit key, the 64-bit keyed hash of
/// its canonical form, in 16 hex digits. Replicas sharing `store.key_secret_*` write the
/// same one; a replay keys the per-email limit on it exactly as the gateway did, and 64
/// bits keep collisions negligible (about one chance in 370,000 among ten million
/// addresses). Without the secret it cannot be tested against a guessed address.
pub fn email_tag(email_hash: u64) -> String {
    format!("{email_hash:016x}")
}

/// `received_at`: RFC 3339 in UTC, to the nanosecond.
pub fn timestamp(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// What the access log says about one request.
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    /// When the request head arrived: the limiter decided it a moment later.
    pub received: SystemTime,
    pub peer: IpAddr,
    pub status: StatusCode,
    pub duration: Duration,
    pub guarded: Option<&'a GuardedRequest>,
    /// Who a request the guard answered itself was charged as.
    pub attribution: Option<&'a Attribution>,
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

    /// Emits the line, unless it is a denial `denials` folds into a summary.
    pub fn emit(&self, denials: &DenialLog) {
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        let outcome = self.outcome();
        let limit = match self.rejection {
            Some(Rejection::RateLimited(denial)) => Some(denial.group.name()),
            _ => None,
        };
        let attribution = self.guarded.map(Attribution::from);
        let attribution = attribution.as_ref().or(self.attribution);
        let client_ip = attribution.map_or(self.peer, |a| a.client_ip());
        // Requests the guard refused; forwarded ones (and failed forwards) always get a line.
        if self.rejection.is_some() && self.refusal.is_none() {
            let denial = Denial {
                outcome,
                limit,
                status: self.status.as_u16(),
                guarded: attribution.is_some(),
                client_ip,
                client_id: attribution.and_then(|a| a.client_id()),
                email_hash: attribution.and_then(|a| a.email_hash()),
            };
            if !denials.admit(&denial, self.received) {
                return;
            }
        }
        let upstream_status = self
            .uniform
            .map(|u| u.0.as_u16())
            .or_else(|| self.upstream.and_then(|u| u.status).map(|s| s.as_u16()));
        tracing::info!(
            target: "access",
            received_at = timestamp(self.received),
            request_id = self.request_id,
            guarded = attribution.map(|_| true),
            client_id = attribution.and_then(|a| a.client_id()),
            client_ip = %client_ip,
            email_hash = attribution.and_then(|a| a.email_hash()).map(email_tag),
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
