//! Summary lines (`log.denials: summarize`, telemetry/denials.rs): one access line with
//! `count`, `received_at` (the first) and `last_received_at` (the last) stands for `count`
//! requests alike in all but their arrival. A replay charges them spread evenly over
//! first..last: each one's true arrival lies in that interval, which is within one
//! `log.denial_window`, so a replayed time is off by less than the window.

use super::reader::{parse_time, LoggedRequest};

/// The most requests one summary line may stand for: a flood of a million requests a
/// second over the longest window (60 s) is 60 million. A larger count is a damaged line.
const MOST: u64 = 100_000_000;

/// A summary line's `count` and `last_received_at`, checked: a count one summary can hold,
/// and the time its last request arrived.
pub(super) fn summary_end(count: u64, last_received_at: Option<&str>) -> Result<u64, String> {
    if !(1..=MOST).contains(&count) {
        return Err(format!("count {count} is not 1 to {MOST}"));
    }
    parse_time(last_received_at.ok_or("a count without last_received_at")?)
}

/// The requests of one summary line after its first.
#[derive(Debug)]
pub(super) struct Expansion {
    request: LoggedRequest,
    first_ns: u64,
    span_ns: u64,
    count: u64,
    next: u64,
}

impl Expansion {
    /// Checks `count` and `last_received_at` of a line whose first request is `first`;
    /// the rest of the requests it stands for.
    pub(super) fn new(
        first: &LoggedRequest,
        count: u64,
        last_received_at: Option<&str>,
    ) -> Result<Self, String> {
        let last_ns = summary_end(count, last_received_at)?;
        let span_ns = last_ns
            .checked_sub(first.at_ns)
            .ok_or("last_received_at is before received_at")?;
        Ok(Expansion {
            request: first.clone(),
            first_ns: first.at_ns,
            span_ns,
            count,
            next: 1,
        })
    }
}

impl Iterator for Expansion {
    type Item = LoggedRequest;

    fn next(&mut self) -> Option<LoggedRequest> {
        if self.next >= self.count {
            return None;
        }
        let offset = u128::from(self.span_ns) * u128::from(self.next) / u128::from(self.count - 1);
        self.next += 1;
        let mut request = self.request.clone();
        request.at_ns = self.first_ns + u64::try_from(offset).unwrap_or(self.span_ns);
        Some(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first() -> LoggedRequest {
        LoggedRequest {
            line: 7,
            at_ns: 1_000,
            client_ip: "203.0.113.7".parse().unwrap(),
            client: Some(0),
            email_hash: Some(42),
            recorded_denial: None,
        }
    }

    #[test]
    fn a_summary_spreads_its_requests_from_first_to_last() {
        let last = "1970-01-01T00:00:00.000002Z";
        let rest: Vec<u64> = Expansion::new(&first(), 5, Some(last))
            .unwrap()
            .map(|r| r.at_ns)
            .collect();
        assert_eq!(rest, [1_250, 1_500, 1_750, 2_000]);
        assert_eq!(Expansion::new(&first(), 1, Some(last)).unwrap().count(), 0);
    }

    #[test]
    fn damaged_summaries_are_refused() {
        let last = Some("1970-01-01T00:00:00.000002Z");
        for (count, last) in [
            (0, last),
            (MOST + 1, last),
            (3, None),
            (3, Some("1970-01-01T00:00:00.0000005Z")),
            (3, Some("yesterday")),
        ] {
            assert!(
                Expansion::new(&first(), count, last).is_err(),
                "{count} {last:?}"
            );
        }
    }
}
