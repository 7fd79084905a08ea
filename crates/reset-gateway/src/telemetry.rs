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
mod json_line;
mod sink;

pub use denials::DenialLog;
pub use fold::Denial;
pub use sink::{dropped_lines, LogSink};

use std::io::{IsTerminal, Write as _};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use reset_guard::Attribution;
use reset_guard::{ClientIp, GuardedRequest, Rejection, UpstreamStatus};

use crate::refusal::Refusal;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use crate::upstream::UpstreamExchange;

/// `log.level` (or `RUST_LOG`) as a filter. The access log is not the gateway's messages
/// but its record of requests (what `simulate` replays): a level raised to quiet the
/// messages (`warn`) keeps it, unless the level names it (`warn,access=off`). Two
/// libraries log at warn level what a client or an outage does many times a second, which
/// the gateway reports its own way: the Redis client each failed reconnection to a
/// cluster node, as an error, each retry of each call (dozens of lines a second while a
/// cluster's seeds refuse the password; the gateway logs an outage once per cause, and
/// every failed request in its metrics), rustls every TLS client that sends an IP address
/// as its server name (wrk, `openssl s_client`, scanners: a line per handshake). The
/// HTTP/2 library logs a malformed request's target at debug level and every request's
/// at trace (its frames' pseudo-headers): a raw email address, which no line may hold
/// unless the operator asked for that library by name. Only rustls's and HTTP/2's errors
/// pass, and none of the Redis client's, unless the level names them (`info,redis=debug`).
fn level(level: &str) -> String {
    let targets = || {
        level
            .split(',')
            .map(|d| d.trim().split('=').next().unwrap_or_default())
    };
    let mut filter = level.to_owned();
    if !targets().any(|t| t == "access") {
        filter.push_str(",access=info");
    }
    // `off` already keeps everything out, and `error` what a floor of `error` would.
    let bare = |name: &str| {
        level
            .split(',')
            .any(|d| d.trim().eq_ignore_ascii_case(name))
    };
    for (library, floor) in NOISY_LIBRARIES {
        let named = targets().any(|t| {
            t == library
                || t.strip_prefix(library)
                    .is_some_and(|rest| rest.starts_with("::"))
        });
        let kept_out = bare("off") || (bare("error") && floor == "error");
        if !(named || kept_out) {
            filter.push_str(&format!(",{library}={floor}"));
        }
    }
    filter
}

/// Libraries whose lines only pass from the level given (`off`: none) unless the level
/// names them (see [`level`]).
const NOISY_LIBRARIES: [(&str, &str); 3] = [("redis", "off"), ("rustls", "error"), ("h2", "error")];

/// The text format's fields as tracing's own format writes them, with line breaks and
/// other control characters escaped: one event is one line, whatever a value holds (a
/// Redis client's error can span lines).
struct OneLineFields(tracing_subscriber::fmt::format::DefaultFields);

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for OneLineFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut text = String::new();
        let inner = tracing_subscriber::fmt::format::Writer::new(&mut text);
        self.0.format_fields(inner, fields)?;
        if !text.contains(char::is_control) {
            return writer.write_str(&text);
        }
        for c in text.chars() {
            match c.is_control() {
                true => write!(writer, "{}", c.escape_default())?,
                false => writer.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Installs the global subscriber, writing to stderr through the non-blocking sink
/// (`sink.rs`); `RUST_LOG` overrides `log.level`. Keep the returned sink until exit: its
/// drop writes out what is queued. Calling it again (tests) is harmless and returns `None`.
pub fn init(log: &LogConfig) -> Option<LogSink> {
    let (writer, sink) = sink::install(log.format, log.queue_lines)?;
    let level = crate::config::env_level().unwrap_or_else(|| log.level.clone());
    let filter = EnvFilter::new(self::level(&level));
    // Colour codes only for a person at a terminal: in a file or a log pipeline they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let installed = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder
            .fmt_fields(OneLineFields(Default::default()))
            .try_init(),
    };
    if installed.is_ok() && log.format == LogFormat::Json {
        sink::write_access_lines_directly();
    }
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
    /// The client the guard resolved for a request it did not charge (another path).
    pub client: Option<&'a ClientIp>,
    pub rejection: Option<&'a Rejection>,
    /// The connection ended before an answer was made.
    pub cut: bool,
    /// A CORS preflight, answered by the gateway (origin allowed).
    pub preflight: bool,
    pub refusal: Option<Refusal>,
    pub upstream: Option<&'a UpstreamExchange>,
    pub uniform: Option<&'a UpstreamStatus>,
    pub include_email: bool,
}

impl AccessRecord<'_> {
    /// The outcomes of requests the guard did not answer itself: a checked reset, and
    /// another route under `other_routes: forward`.
    pub const FORWARD_OUTCOMES: [&'static str; 2] = ["forwarded", "passed_through"];

    /// The outcome of a request whose connection ended before its answer was made.
    pub const CUT: &'static str = "cut";

    /// The outcome of a CORS preflight from an allowed origin.
    pub const PREFLIGHT: &'static str = "preflight";

    /// The status logged for it: nginx's 499, "client closed request".
    pub const CUT_STATUS: StatusCode = match StatusCode::from_u16(499) {
        Ok(status) => status,
        Err(_) => unreachable!(),
    };

    /// The outcome label for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        let [forwarded, passed_through] = Self::FORWARD_OUTCOMES;
        if self.cut {
            return Self::CUT;
        }
        if self.preflight {
            return Self::PREFLIGHT;
        }
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
        let client_ip = attribution.map_or_else(
            || self.client.map_or(self.peer, ClientIp::ip),
            Attribution::client_ip,
        );
        // Requests the guard refused, requests cut while they waited (a client resetting
        // HTTP/2 streams as fast as it opens them would otherwise write a line each), and
        // CORS preflights, which cost a client nothing to repeat; forwarded ones (and failed
        // forwards) always get a line.
        if (self.rejection.is_some() && self.refusal.is_none())
            || self.cut
            || self.preflight
            || self.refusal == Some(Refusal::OriginNotAllowed)
        {
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
        let line = AccessLine {
            received: self.received,
            request_id: self.request_id,
            guarded: attribution.is_some(),
            client_id: attribution.and_then(|a| a.client_id()),
            client_ip,
            email_hash: attribution.and_then(|a| a.email_hash()),
            email: self
                .guarded
                .filter(|_| self.include_email)
                .map(|g| g.email()),
            outcome,
            limit,
            limits_skipped: self.guarded.is_some_and(GuardedRequest::limits_skipped),
            status: self.status.as_u16(),
            upstream_status,
            upstream_error: self.upstream.and_then(|u| u.error.as_deref()),
            upstream_ms: self.upstream.map(|u| millis(u.duration)),
            duration_ms: millis(self.duration),
        };
        match sink::access_writer() {
            Some(mut sink) => {
                let _ = sink.write_all(&line.json(SystemTime::now()));
            }
            None => line.trace(),
        }
    }
}

/// The fields of one access line.
struct AccessLine<'a> {
    received: SystemTime,
    request_id: &'a str,
    guarded: bool,
    client_id: Option<&'a str>,
    client_ip: IpAddr,
    email_hash: Option<u64>,
    email: Option<&'a str>,
    outcome: &'static str,
    limit: Option<&'static str>,
    /// Passed without its limits: Redis could not be asked, `on_error: allow`.
    limits_skipped: bool,
    status: u16,
    upstream_status: Option<u16>,
    /// What QuickBlox did wrong, when the request failed for it.
    upstream_error: Option<&'a str>,
    upstream_ms: Option<f64>,
    duration_ms: f64,
}

impl AccessLine<'_> {
    /// As a `tracing` event: the text format, and any subscriber other than the gateway's.
    fn trace(&self) {
        tracing::info!(
            target: "access",
            received_at = timestamp(self.received),
            request_id = self.request_id,
            guarded = self.guarded.then_some(true),
            client_id = self.client_id,
            client_ip = %self.client_ip,
            email_hash = self.email_hash.map(email_tag),
            email = self.email,
            outcome = self.outcome,
            limit = self.limit,
            limits_skipped = self.limits_skipped.then_some(true),
            status = self.status,
            upstream_status = self.upstream_status,
            upstream_error = self.upstream_error,
            upstream_ms = self.upstream_ms,
            duration_ms = self.duration_ms,
        );
    }

    /// The JSON line `trace` gives under the JSON format, written directly (`json_line.rs`).
    fn json(&self, now: SystemTime) -> Vec<u8> {
        let mut line = json_line::JsonLine::info(now);
        line.time("received_at", self.received);
        line.str("request_id", self.request_id);
        if self.guarded {
            line.bool("guarded", true);
        }
        if let Some(id) = self.client_id {
            line.str("client_id", id);
        }
        line.ip("client_ip", self.client_ip);
        if let Some(hash) = self.email_hash {
            line.hex("email_hash", hash);
        }
        if let Some(email) = self.email {
            line.str("email", email);
        }
        line.str("outcome", self.outcome);
        if let Some(limit) = self.limit {
            line.str("limit", limit);
        }
        if self.limits_skipped {
            line.bool("limits_skipped", true);
        }
        line.uint("status", self.status.into());
        if let Some(status) = self.upstream_status {
            line.uint("upstream_status", status.into());
        }
        if let Some(error) = self.upstream_error {
            line.str("upstream_error", error);
        }
        if let Some(ms) = self.upstream_ms {
            line.float("upstream_ms", ms);
        }
        line.float("duration_ms", self.duration_ms);
        line.finish("access")
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
    use std::sync::{Arc, Mutex};

    /// What the gateway's JSON subscriber writes for `line.trace()`.
    fn formatted_by_tracing(line: &AccessLine<'_>) -> String {
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || line.trace());
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// The line with its own timestamp cut out: the two are stamped at different moments.
    fn without_stamp(line: &str) -> String {
        let end = line.find("\",\"level\"").unwrap();
        format!("{{{}", &line[end + 2..])
    }

    #[test]
    fn the_direct_json_line_is_the_formatters_line() {
        let received = std::time::UNIX_EPOCH + Duration::new(1_795_000_000, 123_456_789);
        let full = AccessLine {
            received,
            request_id: "abc-123",
            guarded: true,
            client_id: Some("ios \"app\"\u{7f}\\\u{1}é"),
            client_ip: "2001:db8::1".parse().unwrap(),
            email_hash: Some(0x00ab_cdef_0123_4567),
            email: Some("us\"er\n\u{2028}@exämple.com"),
            outcome: "rate_limited",
            limit: Some("per_email"),
            limits_skipped: true,
            status: 429,
            upstream_status: Some(404),
            upstream_error: Some("answer body: connection \"closed\""),
            upstream_ms: Some(8000.0),
            duration_ms: 0.031,
        };
        let bare = AccessLine {
            guarded: false,
            client_id: None,
            client_ip: "203.0.113.9".parse().unwrap(),
            email_hash: None,
            email: None,
            outcome: "forwarded",
            limit: None,
            limits_skipped: false,
            status: 200,
            upstream_status: None,
            upstream_error: None,
            upstream_ms: None,
            duration_ms: 12345.678,
            ..full
        };
        for line in [full, bare] {
            let direct = String::from_utf8(line.json(SystemTime::now())).unwrap();
            assert_eq!(
                without_stamp(&direct),
                without_stamp(&formatted_by_tracing(&line))
            );
        }
    }

    #[test]
    fn the_direct_json_line_is_stamped_as_the_formatter_stamps() {
        let at = std::time::UNIX_EPOCH + Duration::new(1_795_000_000, 123_456_789);
        let line = AccessLine {
            received: at,
            request_id: "x",
            guarded: false,
            client_id: None,
            client_ip: "127.0.0.1".parse().unwrap(),
            email_hash: None,
            email: None,
            outcome: "forwarded",
            limit: None,
            limits_skipped: false,
            status: 200,
            upstream_status: None,
            upstream_error: None,
            upstream_ms: None,
            duration_ms: 0.0,
        };
        let json = String::from_utf8(line.json(at)).unwrap();
        assert!(
            json.starts_with(
                "{\"timestamp\":\"2026-11-18T11:06:40.123456Z\",\"level\":\"INFO\",\"received_at\":\"2026-11-18T11:06:40.123456789Z\""
            ),
            "{json}"
        );
        assert!(json.ends_with(",\"target\":\"access\"}\n"), "{json}");
    }

    #[test]
    fn simulate_scans_the_gateways_own_lines_without_serde() {
        // `simulate` reads lines like these with its scanner, and leaves those with
        // escapes (a client id with a quote) to serde_json; both read them alike.
        let line = AccessLine {
            received: std::time::UNIX_EPOCH + Duration::new(1_795_000_000, 5),
            request_id: "0af3-77",
            guarded: true,
            client_id: Some("ios"),
            client_ip: "2001:db8::1".parse().unwrap(),
            email_hash: Some(0x00ab_cdef_0123_4567),
            email: Some("bob@example.com"),
            outcome: "rate_limited",
            limit: Some("per_email"),
            limits_skipped: false,
            status: 429,
            upstream_status: Some(200),
            upstream_error: None,
            upstream_ms: Some(41.2),
            duration_ms: 0.031,
        };
        let quoted = AccessLine {
            client_id: Some("ios \"app\""),
            ..line
        };
        let failed = AccessLine {
            upstream_error: Some("connect refused"),
            ..line
        };
        for (line, scanned) in [(line, true), (quoted, false), (failed, true)] {
            let json = line.json(SystemTime::now());
            let json = json.trim_ascii_end();
            let by_scanner = crate::simulate::access_line::scan(json);
            assert_eq!(by_scanner.is_some(), scanned);
            let by_serde = serde_json::from_slice(json).unwrap();
            assert_eq!(
                by_scanner.unwrap_or(by_serde),
                serde_json::from_slice(json).unwrap()
            );
        }
    }

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

    #[test]
    fn the_redis_client_logs_nothing_unless_the_level_names_it() {
        let with = |level: &str| {
            super::level(level)
                .replace(",access=info", "")
                .replace(",rustls=error", "")
                .replace(",h2=error", "")
        };
        assert_eq!(with("info"), "info,redis=off");
        assert_eq!(
            with("warn,reset_guard::limit::redis=debug"),
            "warn,reset_guard::limit::redis=debug,redis=off"
        );
        assert_eq!(with("info,redis=debug"), "info,redis=debug");
        assert_eq!(
            with("info,redis::cluster_async=warn"),
            "info,redis::cluster_async=warn"
        );
        assert_eq!(with("off"), "off");
        // Its errors too: at `error` level, it alone is named.
        assert_eq!(super::level("error"), "error,access=info,redis=off");
        // rustls alike.
        assert_eq!(
            super::level("info"),
            "info,access=info,redis=off,rustls=error,h2=error"
        );
        assert_eq!(
            super::level("info,rustls=warn"),
            "info,rustls=warn,access=info,redis=off,h2=error"
        );
        // h2 too: at debug and trace it logs request targets, email addresses and all.
        assert_eq!(
            super::level("trace"),
            "trace,access=info,redis=off,rustls=error,h2=error"
        );
        assert_eq!(
            super::level("debug,h2=trace"),
            "debug,h2=trace,access=info,redis=off,rustls=error"
        );
    }

    #[test]
    fn the_access_log_is_kept_at_any_level_unless_the_level_names_it() {
        let level = |l: &str| {
            super::level(l)
                .replace(",rustls=error", "")
                .replace(",h2=error", "")
        };
        assert_eq!(level("warn"), "warn,access=info,redis=off");
        assert_eq!(level("off"), "off,access=info");
        assert_eq!(level("warn,access=off"), "warn,access=off,redis=off");
        assert_eq!(level("access=debug"), "access=debug,redis=off");
    }
}
