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
        let per_ns = u64::try_from(per.as_nanos()).map_err(|_| "per is too long".to_owned())?;
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
            .ok_or_else(|| "burst × per is too long".to_owned())?;
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
