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

/// A summary line's requests after its first, checked: how many (`count` less one) and
/// when the last arrived.
pub(super) fn rest(
    first_ns: u64,
    count: u64,
    last_received_at: Option<&str>,
) -> Result<(u32, u64), String> {
    let last_ns = summary_end(count, last_received_at)?;
    if last_ns < first_ns {
        return Err("last_received_at is before received_at".into());
    }
    let more = u32::try_from(count - 1).map_err(|_| format!("count {count} is too large"))?;
    Ok((more, last_ns))
}

/// The requests of one summary line after its first, made one at a time as the replay
/// reaches them (a flood's summaries stand for millions of requests, which are never
/// held at once).
#[derive(Debug)]
pub(super) struct Expansion {
    /// The next request (its arrival set), a copy of the first in all else.
    request: LoggedRequest,
    first_ns: u64,
    last_ns: u64,
    count: u64,
    /// The index of `request` among the line's requests (the first is 0).
    next: u64,
}

impl Expansion {
    /// The requests after `first`, if its line stands for more than itself.
    pub(super) fn after(first: &LoggedRequest) -> Option<Self> {
        if first.more == 0 {
            return None;
        }
        let mut expansion = Expansion {
            request: LoggedRequest {
                more: 0,
                ..first.clone()
            },
            first_ns: first.at_ns,
            last_ns: first.last_ns,
            count: u64::from(first.more) + 1,
            next: 1,
        };
        expansion.request.at_ns = expansion.at(1);
        Some(expansion)
    }

    /// The arrival of request `i` of the line's, spread evenly from first to last.
    fn at(&self, i: u64) -> u64 {
        let span = self.last_ns - self.first_ns;
        let offset = u128::from(span) * u128::from(i) / u128::from(self.count - 1);
        self.first_ns + u64::try_from(offset).unwrap_or(span)
    }

    /// Whether every request was made.
    pub(super) fn is_done(&self) -> bool {
        self.next >= self.count
    }

    /// The next request's arrival, then its line: the order the replay takes requests in.
    pub(super) fn order(&self) -> (u64, u64) {
        (self.request.at_ns, self.request.line)
    }
}

impl Iterator for Expansion {
    type Item = LoggedRequest;

    fn next(&mut self) -> Option<LoggedRequest> {
        if self.next >= self.count {
            return None;
        }
        let mut request = self.request.clone();
        request.last_ns = request.at_ns;
        self.next += 1;
        if self.next < self.count {
            self.request.at_ns = self.at(self.next);
        }
        Some(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(count: u64, last: Option<&str>) -> Result<LoggedRequest, String> {
        let (more, last_ns) = rest(1_000, count, last)?;
        Ok(LoggedRequest {
            line: 7,
            at_ns: 1_000,
            client_ip: "203.0.113.7".parse().unwrap(),
            client: Some(0),
            email_hash: Some(42),
            recorded_denial: None,
            more,
            last_ns,
        })
    }

    #[test]
    fn a_summary_spreads_its_requests_from_first_to_last() {
        let last = Some("1970-01-01T00:00:00.000002Z");
        let rest: Vec<u64> = Expansion::after(&first(5, last).unwrap())
            .unwrap()
            .map(|r| r.at_ns)
            .collect();
        assert_eq!(rest, [1_250, 1_500, 1_750, 2_000]);
        assert!(Expansion::after(&first(1, last).unwrap()).is_none());
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
            assert!(first(count, last).is_err(), "{count} {last:?}");
        }
    }
}
