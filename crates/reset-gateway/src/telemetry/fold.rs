//! Folding repeated denials: within one window, the first few denials of one identity
//! (the same outcome, limit and keys) are logged in full and the rest only counted, to be
//! logged as one summary line when the window closes.
//!
//! Time is passed in (nanoseconds since the Unix epoch: the requests' own `received_at`),
//! so the window logic is tested without waiting. The table is bounded: once it holds
//! [`Folder::CAPACITY`] identities, a denial of a new identity is logged in full. Folding
//! it into a coarser summary (per IP alone, say) would keep the log smaller but lose the
//! keys a replay charges; a flood over that many distinct identities is also one whose
//! identities rarely repeat within a window, so little folding is lost.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use reset_guard::internals::PassThroughHasher;

/// What makes two denials "the same": everything their access lines would say except
/// when they arrived (and the request id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Denial<'a> {
    pub outcome: &'static str,
    pub limit: Option<&'static str>,
    pub status: u16,
    pub guarded: bool,
    pub client_ip: IpAddr,
    pub client_id: Option<&'a str>,
    pub email_hash: Option<u64>,
}

/// [`Denial`] kept in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub outcome: &'static str,
    pub limit: Option<&'static str>,
    pub status: u16,
    pub guarded: bool,
    pub client_ip: IpAddr,
    pub client_id: Option<Box<str>>,
    pub email_hash: Option<u64>,
}

impl Identity {
    fn of(denial: &Denial<'_>) -> Self {
        Identity {
            outcome: denial.outcome,
            limit: denial.limit,
            status: denial.status,
            guarded: denial.guarded,
            client_ip: denial.client_ip,
            client_id: denial.client_id.map(Box::from),
            email_hash: denial.email_hash,
        }
    }

    fn is(&self, denial: &Denial<'_>) -> bool {
        self.outcome == denial.outcome
            && self.limit == denial.limit
            && self.status == denial.status
            && self.guarded == denial.guarded
            && self.client_ip == denial.client_ip
            && self.client_id.as_deref() == denial.client_id
            && self.email_hash == denial.email_hash
    }
}

/// Denials left out of the log, to be written as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub identity: Identity,
    pub count: u64,
    /// When the first and the last of them arrived (ns since the Unix epoch).
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Whether to write a denial's access line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Log,
    Fold,
}

/// One identity's current window.
#[derive(Debug)]
struct Window {
    identity: Identity,
    opened_ns: u64,
    seen: u64,
    folded: Option<(u64, u64, u64)>,
}

impl Window {
    fn open(identity: Identity, at_ns: u64) -> Self {
        Window {
            identity,
            opened_ns: at_ns,
            seen: 1,
            folded: None,
        }
    }

    fn summary(&self) -> Option<Summary> {
        self.folded.map(|(count, first_ns, last_ns)| Summary {
            identity: self.identity.clone(),
            count,
            first_ns,
            last_ns,
        })
    }
}

/// Independent tables, so that worker threads rarely wait on one another's lock.
const SHARDS: usize = 16;

/// One shard's windows, by the identity's hash: already keyed at random, so not hashed again.
type Windows = HashMap<u64, Window, BuildHasherDefault<PassThroughHasher>>;

/// The folding state of the whole process.
#[derive(Debug)]
pub struct Folder {
    window_ns: u64,
    logged_in_full: u64,
    per_shard: usize,
    hasher: RandomState,
    shards: [Mutex<Windows>; SHARDS],
}

impl Folder {
    /// Denials of one identity logged in full at the start of each window.
    pub const LOGGED_IN_FULL: u64 = 3;
    /// Identities folded at once, at most.
    pub const CAPACITY: usize = 65_536;

    /// A table folding over `window`.
    pub fn new(window: Duration) -> Self {
        Self::with_limits(window, Self::LOGGED_IN_FULL, Self::CAPACITY)
    }

    fn with_limits(window: Duration, logged_in_full: u64, capacity: usize) -> Self {
        Folder {
            window_ns: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX).max(1),
            logged_in_full,
            per_shard: capacity.div_ceil(SHARDS),
            // Keyed at random: client IPs and ids are the client's to choose.
            hasher: RandomState::new(),
            shards: std::array::from_fn(|_| Mutex::new(Windows::default())),
        }
    }

    /// Identities folded at most.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }

    /// The identity's keyed hash. Its fields are gathered on the stack and hashed in one
    /// piece: fed to SipHash one by one, they cost four times as much.
    fn hash_of(&self, denial: &Denial<'_>) -> u64 {
        let mut gathered = Gathered {
            bytes: [0; 128],
            len: 0,
            hasher: self.hasher.build_hasher(),
        };
        denial.hash(&mut gathered);
        gathered.finish()
    }

    /// Decides one denial that arrived at `at_ns`; when it closes its identity's previous
    /// window, that window's summary comes with the decision.
    pub fn observe(&self, denial: &Denial<'_>, at_ns: u64) -> (Decision, Option<Summary>) {
        let hash = self.hash_of(denial);
        // The shard from the middle bits: the table uses the low ones for its slot and the
        // top ones for its tags.
        let mut shard = lock(&self.shards[((hash >> 32) as usize) % SHARDS]);
        let held = shard.len();
        let Some(window) = shard.get_mut(&hash) else {
            if held < self.per_shard {
                shard.insert(hash, Window::open(Identity::of(denial), at_ns));
            }
            return (Decision::Log, None);
        };
        if !window.identity.is(denial) {
            // Two identities with one 64-bit hash: the newcomer is logged in full.
            return (Decision::Log, None);
        }
        if at_ns.saturating_sub(window.opened_ns) >= self.window_ns {
            let closed = window.summary();
            *window = Window::open(window.identity.clone(), at_ns);
            return (Decision::Log, closed);
        }
        window.seen += 1;
        if window.seen <= self.logged_in_full {
            return (Decision::Log, None);
        }
        window.folded = Some(match window.folded {
            None => (1, at_ns, at_ns),
            Some((count, first, last)) => (count + 1, first.min(at_ns), last.max(at_ns)),
        });
        (Decision::Fold, None)
    }

    /// Closes every window that ended by `now_ns`: their summaries, and room for new
    /// identities.
    pub fn sweep(&self, now_ns: u64) -> Vec<Summary> {
        self.close(|window| now_ns.saturating_sub(window.opened_ns) >= self.window_ns)
    }

    /// Closes every window (shutdown).
    pub fn drain(&self) -> Vec<Summary> {
        self.close(|_| true)
    }

    fn close(&self, ended: impl Fn(&Window) -> bool) -> Vec<Summary> {
        let mut summaries = Vec::new();
        for shard in &self.shards {
            lock(shard).retain(|_, window| {
                if !ended(window) {
                    return true;
                }
                summaries.extend(window.summary());
                false
            });
        }
        summaries.sort_by_key(|s| s.first_ns);
        summaries
    }
}

/// A hasher's input, gathered into one buffer before it is hashed.
struct Gathered<H> {
    bytes: [u8; 128],
    len: usize,
    hasher: H,
}

impl<H: Hasher> Gathered<H> {
    fn flush(&mut self) {
        self.hasher.write(&self.bytes[..self.len]);
        self.len = 0;
    }
}

impl<H: Hasher + Clone> Hasher for Gathered<H> {
    fn write(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.bytes.len() {
            self.flush();
        }
        if bytes.len() > self.bytes.len() {
            self.hasher.write(bytes);
            return;
        }
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn finish(&self) -> u64 {
        let mut hasher = self.hasher.clone();
        hasher.write(&self.bytes[..self.len]);
        hasher.finish()
    }
}

/// A panic while holding a shard leaves counts that are still counts.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
