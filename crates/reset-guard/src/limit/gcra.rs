//! The generic cell rate algorithm on one quota's theoretical arrival time (TAT).
//! The Redis script does the same arithmetic; keep the two in step.

/// What one quota says about one request at `now`, without changing anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cell {
    /// Admitted: store `tat`; `remaining` more requests fit now; the quota is whole
    /// again after `reset_ns`.
    Admit {
        tat: u64,
        remaining: u64,
        reset_ns: u64,
    },
    /// Denied: a request fits again after `retry_ns`.
    Deny { retry_ns: u64 },
}

/// `interval_ns` is `per / requests`; `capacity_ns` is `interval_ns * burst`. A stored `tat`
/// at or before `now` is the same as no state at all, which is what makes idle keys safe
/// to forget.
pub(crate) fn evaluate(tat: u64, now: u64, interval_ns: u64, capacity_ns: u64) -> Cell {
    let new_tat = tat.max(now).saturating_add(interval_ns);
    let ahead = new_tat - now;
    if ahead > capacity_ns {
        Cell::Deny {
            retry_ns: ahead - capacity_ns,
        }
    } else {
        Cell::Admit {
            tat: new_tat,
            remaining: (capacity_ns - ahead) / interval_ns,
            reset_ns: ahead,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval() {
        // 3 per 3s: one every second, three at once.
        let (interval, capacity) = (1_000, 3_000);
        let mut tat = 0;
        for remaining in [2, 1, 0] {
            match evaluate(tat, 10_000, interval, capacity) {
                Cell::Admit {
                    tat: t,
                    remaining: r,
                    ..
                } => {
                    assert_eq!(r, remaining);
                    tat = t;
                }
                Cell::Deny { .. } => panic!("denied inside the burst"),
            }
        }
        assert_eq!(
            evaluate(tat, 10_000, interval, capacity),
            Cell::Deny { retry_ns: 1_000 }
        );
        assert_eq!(
            evaluate(tat, 10_400, interval, capacity),
            Cell::Deny { retry_ns: 600 }
        );
        assert!(matches!(
            evaluate(tat, 11_000, interval, capacity),
            Cell::Admit { remaining: 0, .. }
        ));
    }

    #[test]
    fn stale_state_equals_fresh_state() {
        let fresh = evaluate(0, 50_000, 1_000, 3_000);
        assert_eq!(
            evaluate(49_999, 50_000, 1_000, 3_000),
            evaluate(49_000, 50_000, 1_000, 3_000)
        );
        assert_eq!(evaluate(50_000, 50_000, 1_000, 3_000), fresh);
    }
}
