//! Time for the limiters, injectable so tests never sleep for a rate to refill.

use std::time::Instant;

/// A monotonic clock in nanoseconds since some fixed origin.
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since the clock's origin; never goes backwards.
    fn now(&self) -> u64;
}

/// The real clock.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock set from outside, forward only: a replay sets it to each recorded request's
/// time before deciding it.
#[derive(Debug, Default)]
pub struct SetClock {
    nanos: std::sync::atomic::AtomicU64,
}

impl SetClock {
    /// Moves the clock to `nanos`, unless it already reads later (time never goes back).
    pub fn set(&self, nanos: u64) {
        self.nanos
            .fetch_max(nanos, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clock for SetClock {
    fn now(&self) -> u64 {
        self.nanos.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
pub use manual::ManualClock;

#[cfg(test)]
mod manual {
    use std::fmt;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::Clock;

    /// A clock that moves only when told to; clones share the same time.
    #[derive(Clone, Default)]
    pub struct ManualClock {
        nanos: Arc<AtomicU64>,
    }

    impl ManualClock {
        /// A clock at its origin.
        pub fn new() -> Self {
            Self::default()
        }

        /// Moves time forward.
        pub fn advance(&self, by: Duration) {
            let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            self.nanos.fetch_add(nanos, Ordering::SeqCst);
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> u64 {
            self.nanos.load(Ordering::SeqCst)
        }
    }

    impl fmt::Debug for ManualClock {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "ManualClock({}ns)", self.now())
        }
    }
}
