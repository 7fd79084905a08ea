//! One quota: `requests` per `per`, with room for `burst` at once, as GCRA parameters.

use std::time::Duration;

/// A checked quota, as GCRA parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    /// Requests per window.
    pub requests: u32,
    /// The window.
    pub per: Duration,
    /// Requests at once.
    pub burst: u32,
    /// Logs and counts instead of denying.
    pub shadow: bool,
    pub(crate) interval_ns: u64,
    pub(crate) capacity_ns: u64,
}

/// As its `quota` label and log field: `3/1h`, with the burst where it is not `requests`
/// (`200/1s burst 400`) and ` shadow` for a shadow quota, so that two quotas of one group
/// (never alike: the configuration refuses that) never read the same.
impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per = crate::duration::ConfigDuration(self.per);
        write!(f, "{}/{per}", self.requests)?;
        if self.burst != self.requests {
            write!(f, " burst {}", self.burst)?;
        }
        if self.shadow {
            f.write_str(" shadow")?;
        }
        Ok(())
    }
}

/// The longest window, and the longest a burst may take to earn back: a hundred years.
/// A state's time is kept in nanoseconds of a clock that may count from 1970 (a replayed
/// access log's): `u64` holds 584 years, so that plus this never overflows, and Redis's
/// microseconds stay exact in a double (below 2^53).
const LONGEST_NS: u64 = 36_500 * 86_400 * 1_000_000_000;

impl Quota {
    /// `requests` per `per`, with room for `burst` at once; the error says which rule
    /// the numbers break.
    pub(crate) fn new(
        requests: u32,
        per: Duration,
        burst: Option<u32>,
        shadow: bool,
    ) -> Result<Quota, String> {
        if requests == 0 {
            return Err("requests must be at least 1".into());
        }
        let per_ns = u64::try_from(per.as_nanos())
            .ok()
            .filter(|ns| *ns <= LONGEST_NS)
            .ok_or_else(|| "per is too long (at most 36500d, a hundred years)".to_owned())?;
        if per_ns == 0 {
            return Err("per must be longer than zero".into());
        }
        let burst = burst.unwrap_or(requests);
        if burst == 0 {
            return Err("burst must be at least 1".into());
        }
        let interval_ns = per_ns / u64::from(requests);
        if interval_ns == 0 {
            return Err("more than one request per nanosecond".into());
        }
        let capacity_ns = interval_ns
            .checked_mul(u64::from(burst))
            .filter(|ns| *ns <= LONGEST_NS)
            .ok_or_else(|| {
                "burst × per / requests is too long (at most a hundred years)".to_owned()
            })?;
        Ok(Quota {
            requests,
            per,
            burst,
            shadow,
            interval_ns,
            capacity_ns,
        })
    }

    /// The window in whole seconds, at least 1, for `RateLimit-Policy`.
    pub fn window_secs(&self) -> u64 {
        self.per.as_secs().max(1)
    }

    /// Same limit, whatever the shadow flag: state carries over a reload between them.
    pub(crate) fn same_limit(&self, other: &Quota) -> bool {
        self.interval_ns == other.interval_ns && self.capacity_ns == other.capacity_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_reads_as_written_to_the_millisecond() {
        let quota = |requests, per_ms, burst, shadow| {
            Quota::new(requests, Duration::from_millis(per_ms), burst, shadow)
                .unwrap()
                .to_string()
        };
        assert_eq!(quota(3, 3_600_000, None, false), "3/1h");
        assert_eq!(quota(200, 1_000, Some(400), false), "200/1s burst 400");
        // Below a second, what whole seconds (the log's former field) read as 0.
        assert_eq!(quota(2, 500, None, true), "2/500ms shadow");
        assert_eq!(quota(2, 900, None, true), "2/900ms shadow");
        assert_eq!(quota(5, 90_000, None, false), "5/90s");
        assert_eq!(quota(1, 7 * 86_400_000, None, false), "1/7d");
    }
}
