//! Reads the gateway's JSON access log (telemetry.rs writes it) into the requests a
//! replay charges: when each arrived and what each limit group was keyed on.
//!
//! Lines that are not access lines (other log events, text, blank lines) are skipped;
//! access lines of requests that never reached the limits (other routes, wrong method)
//! are counted and skipped; an access line that cannot be read is reported with its
//! line number and skipped. A summary line of folded denials stands for its `count`
//! requests (summary.rs).

use std::io::BufRead;
use std::net::IpAddr;
use std::sync::LazyLock;

use memchr::memmem;

use reset_guard::LimitGroup;

use super::access_line::AccessLine;

/// One charged request as the log tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    /// Line number in the log, from 1.
    pub line: u64,
    /// When it arrived: nanoseconds since the Unix epoch.
    pub at_ns: u64,
    /// The client IP the per-IP limit was keyed on.
    pub client_ip: IpAddr,
    /// The client, as an index into [`Reader::clients`], once authenticated.
    pub client: Option<u32>,
    /// The per-email limit key, once the address was valid.
    pub email_hash: Option<u64>,
    /// The group that refused it when it was recorded (`outcome: rate_limited`).
    pub recorded_denial: Option<LimitGroup>,
    /// How many more requests alike its line stands for (a summary line's `count` less
    /// one; 0 for a line of its own), spread evenly up to `last_ns` (summary.rs).
    pub more: u32,
    /// When the last of them arrived (`at_ns` for a line of its own).
    pub last_ns: u64,
}

/// What went wrong with one access line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// Line number, from 1.
    pub line: u64,
    /// Why it was skipped.
    pub reason: String,
}

/// Reads a log line by line.
#[derive(Debug, Default)]
pub struct Reader {
    /// Client ids seen, in order of first appearance.
    pub clients: Vec<String>,
    /// Access lines of requests that never reached the limits.
    pub unguarded: u64,
    /// Requests cut before their answer (`outcome: cut`, a summary counting as its
    /// `count`): the log does not say what they were charged.
    pub cut: u64,
    /// Lines that are not access lines.
    pub other_lines: u64,
    /// Access lines skipped as unreadable (the first hundred).
    pub bad_lines: Vec<BadLine>,
    bad_lines_total: u64,
    line: u64,
}

/// Most unreadable lines remembered one by one (the rest are only counted).
const BAD_LINES_KEPT: usize = 100;

impl Reader {
    /// Reads every line of `input`, handing each charged request (a summary line's as
    /// one, with the number of requests alike it stands for) to `each` with the client ids
    /// seen so far. Fails only when `input` itself cannot be read.
    pub fn read_all(
        &mut self,
        mut input: impl BufRead,
        mut each: impl FnMut(LoggedRequest, &[String]),
    ) -> std::io::Result<()> {
        // Lines are read where they lie in the input's buffer; only a line cut by the
        // buffer's end is copied, to be completed from the next read.
        let mut cut = Vec::new();
        loop {
            let chunk = input.fill_buf()?;
            if chunk.is_empty() {
                if !cut.is_empty() {
                    self.take(&cut, &mut each);
                }
                return Ok(());
            }
            let mut used = 0;
            if !cut.is_empty() {
                match memchr::memchr(b'\n', chunk) {
                    Some(newline) => {
                        cut.extend_from_slice(&chunk[..newline]);
                        self.take(&cut, &mut each);
                        cut.clear();
                        used = newline + 1;
                    }
                    None => {
                        cut.extend_from_slice(chunk);
                        used = chunk.len();
                    }
                }
            }
            if cut.is_empty() {
                let start = used;
                for newline in memchr::memchr_iter(b'\n', &chunk[start..]) {
                    let end = start + newline;
                    self.take(&chunk[used..end], &mut each);
                    used = end + 1;
                }
                cut.extend_from_slice(&chunk[used..]);
            }
            let read = chunk.len();
            input.consume(read);
        }
    }

    /// Reads one line and hands on the request it stands for.
    fn take(&mut self, line: &[u8], each: &mut impl FnMut(LoggedRequest, &[String])) {
        if let Some(request) = self.line(line) {
            each(request, &self.clients);
        }
    }

    /// Access lines skipped as unreadable (more may have been than are listed).
    pub fn bad_line_count(&self) -> u64 {
        self.bad_lines_total
    }

    /// Reads one line (with or without its newline).
    pub fn line(&mut self, bytes: &[u8]) -> Option<LoggedRequest> {
        self.line += 1;
        // Most lines of a busy log are access lines; the rest are cheap to tell apart.
        if !is_access_line(bytes) {
            // Only access lines carry received_at: this one lost its end (a log shipper's
            // line limit, a file cut while written).
            if RECEIVED_AT.find(bytes).is_some() {
                self.bad("an access line cut short (no \"target\":\"access\" at its end)".into());
            } else {
                self.other_lines += 1;
            }
            return None;
        }
        let parsed = AccessLine::parse(bytes.trim_ascii_end())
            .map_err(|e| format!("not a JSON access line: {e}"))
            .and_then(|access| self.request(access));
        match parsed {
            Ok(request) => request,
            Err(reason) => {
                self.bad(reason);
                None
            }
        }
    }

    fn bad(&mut self, reason: String) {
        self.bad_lines_total += 1;
        if self.bad_lines.len() < BAD_LINES_KEPT {
            self.bad_lines.push(BadLine {
                line: self.line,
                reason,
            });
        }
    }

    fn request(&mut self, access: AccessLine<'_>) -> Result<Option<LoggedRequest>, String> {
        if access.target.as_deref() != Some("access") {
            self.other_lines += 1;
            return Ok(None);
        }
        if access.outcome.as_deref() == Some("cut") {
            // Not replayed, but read as carefully as a line that is: a count no summary can
            // hold, or times that are not times, make it a bad line.
            parse_time(access.received_at.as_deref().ok_or("no received_at")?)?;
            let count = match access.count {
                Some(count) => {
                    super::summary::summary_end(count, access.last_received_at.as_deref())?;
                    count
                }
                None => 1,
            };
            self.cut = self.cut.saturating_add(count);
            return Ok(None);
        }
        if access.guarded != Some(true) {
            self.unguarded += 1;
            return Ok(None);
        }
        let received = access
            .received_at
            .ok_or("no received_at (recorded by an older gateway?)")?;
        let at_ns = parse_time(&received)?;
        let client_ip = access
            .client_ip
            .ok_or("no client_ip")?
            .parse::<IpAddr>()
            .map_err(|_| "client_ip is not an IP address")?;
        let client = access.client_id.map(|id| self.client(&id));
        let email_hash = access
            .email_hash
            .map(|hash| parse_hash(&hash))
            .transpose()?;
        let recorded_denial = match access.outcome.as_deref() {
            Some("rate_limited") => Some(group_named(access.limit.as_deref())?),
            Some(_) => None,
            None => return Err("no outcome".into()),
        };
        let (more, last_ns) = match access.count {
            Some(count) => super::summary::rest(at_ns, count, access.last_received_at.as_deref())?,
            None => (0, at_ns),
        };
        Ok(Some(LoggedRequest {
            line: self.line,
            at_ns,
            client_ip: client_ip.to_canonical(),
            client,
            email_hash,
            recorded_denial,
            more,
            last_ns,
        }))
    }

    fn client(&mut self, id: &str) -> u32 {
        let index = match self.clients.iter().position(|known| known == id) {
            Some(index) => index,
            None => {
                self.clients.push(id.to_owned());
                self.clients.len() - 1
            }
        };
        u32::try_from(index).unwrap_or(u32::MAX)
    }
}

/// Whether `line` may be an access line: it names the target, as the gateway writes it
/// at its end (looked at first) or anywhere.
static RECEIVED_AT: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(br#""received_at":""#));

fn is_access_line(line: &[u8]) -> bool {
    const TARGET: &[u8] = br#""target":"access""#;
    static FINDER: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(TARGET));
    let end = line.trim_ascii_end();
    end.strip_suffix(b"}")
        .is_some_and(|end| end.ends_with(TARGET))
        || FINDER.find(line).is_some()
}

/// RFC 3339 to nanoseconds since the Unix epoch.
pub fn parse_time(text: &str) -> Result<u64, String> {
    if let Some(ns) = parse_utc_time(text.as_bytes()) {
        return Ok(ns);
    }
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("received_at {text:?} is not an RFC 3339 time"))?;
    u64::try_from(at.unix_timestamp_nanos())
        .map_err(|_| format!("received_at {text:?} is before 1970"))
}

/// The form telemetry.rs writes, `YYYY-MM-DDTHH:MM:SS.fffffffffZ` (any number of
/// fraction digits up to nine, or none), read by hand: the general parser took a tenth of a
/// replay's time. Anything else (offsets, leap seconds, out-of-range fields) is left to it.
fn parse_utc_time(text: &[u8]) -> Option<u64> {
    let digits = |range: std::ops::Range<usize>| -> Option<u64> {
        let mut n = 0u64;
        for &b in text.get(range)? {
            if !b.is_ascii_digit() {
                return None;
            }
            n = n * 10 + u64::from(b - b'0');
        }
        Some(n)
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if text.last() != Some(&b'Z') || separators.iter().any(|&(i, c)| text.get(i) != Some(&c)) {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let fraction = &text[19..text.len() - 1];
    let nanos = match fraction {
        [] => 0,
        [b'.', rest @ ..] if (1..=9).contains(&rest.len()) => {
            digits(20..20 + rest.len())? * 10u64.pow(9 - rest.len() as u32)
        }
        _ => return None,
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if year < 1970
        || !(1..=12).contains(&month)
        || day == 0
        || day > month_days[month as usize - 1]
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    // Days since 1970-01-01 of a civil date (H. Hinnant's days_from_civil).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = (era * 146_097 + day_of_era).checked_sub(719_468)?;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    seconds.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// The 16 hex digits telemetry.rs writes.
fn parse_hash(text: &str) -> Result<u64, String> {
    if text.len() != 16 {
        return Err(format!(
            "email_hash {text:?} is not 16 hex digits (recorded by an older gateway?)"
        ));
    }
    u64::from_str_radix(text, 16).map_err(|_| format!("email_hash {text:?} is not hex"))
}

fn group_named(name: Option<&str>) -> Result<LimitGroup, String> {
    LimitGroup::ALL
        .into_iter()
        .find(|group| Some(group.name()) == name)
        .ok_or_else(|| format!("rate_limited with an unknown limit {name:?}"))
}
