//! Replays logged requests, in arrival order, through one or two limit configurations
//! (reset-guard's [`Replay`]: the gateway's own in-memory limiter on a clock set from the
//! log) and tallies, per quota, what each would have done.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use reset_guard::internals::{Charge, QuotaOutcome, Recorded, Replay};
use reset_guard::{GuardSettings, LimitGroup, Quota};

use super::distinct::DistinctKeys;
use super::reader::LoggedRequest;

/// Log lines are written when requests finish, so a line may follow lines of requests
/// that arrived after it. Requests are held this long (in log time) to be put in order.
pub const REORDER_WINDOW: Duration = Duration::from_secs(300);

/// What one quota made of the replayed traffic.
#[derive(Debug, Clone)]
pub struct QuotaTally {
    /// The group.
    pub group: LimitGroup,
    /// The quota.
    pub quota: Quota,
    /// Requests that reached it.
    pub seen: u64,
    /// Requests it refused (would refuse, for a shadow quota), whichever other quota of
    /// the group refused them too.
    pub denied: u64,
    /// The most any key used of its burst at once, as a fraction (1: it was refused).
    pub peak_use: f64,
}

/// One configuration's replay.
#[derive(Debug)]
pub struct Tally {
    replay: Replay,
    /// Per quota, group by group.
    pub quotas: Vec<QuotaTally>,
    /// Where each group's quotas start in `quotas`.
    first_quota: [usize; 4],
    keys: DistinctKeys,
    /// Requests replayed.
    pub requests: u64,
    /// Requests an enforced quota refused.
    pub denied: u64,
    /// Requests refused, by group.
    pub denied_by: [u64; 4],
    /// Requests this replay let past a group the recording refused them at: what they
    /// would have met after it (the client, the address) is not in the log, so those
    /// groups were not charged.
    pub unknown_beyond: u64,
}

impl Tally {
    fn new(settings: GuardSettings, max_keys: usize) -> Tally {
        let mut first_quota = [0; 4];
        let mut next = 0;
        for (first, group) in first_quota.iter_mut().zip(LimitGroup::ALL) {
            *first = next;
            next += settings.quotas(group).len();
        }
        let quotas = LimitGroup::ALL
            .into_iter()
            .flat_map(|group| {
                settings.quotas(group).iter().map(move |quota| QuotaTally {
                    group,
                    quota: *quota,
                    seen: 0,
                    denied: 0,
                    peak_use: 0.0,
                })
            })
            .collect();
        Tally {
            replay: Replay::new(settings, max_keys),
            quotas,
            first_quota,
            keys: DistinctKeys::default(),
            requests: 0,
            denied: 0,
            denied_by: [0; 4],
            unknown_beyond: 0,
        }
    }

    /// Distinct keys the group was charged on.
    pub fn distinct_keys(&self, group: LimitGroup) -> usize {
        self.keys.count(group_index(group))
    }

    /// Decides one request; returns the group that refused it.
    fn decide(&mut self, request: &LoggedRequest, recorded: &Recorded<'_>) -> Option<LimitGroup> {
        self.requests += 1;
        let Tally {
            replay,
            quotas,
            first_quota,
            keys,
            ..
        } = self;
        let denial = replay.decide(request.at_ns, recorded, |charge: Charge| {
            let group = group_index(charge.group);
            keys.add(group, charge.key);
            let Some(tally) = quotas
                .get_mut(first_quota[group] + charge.position)
                .filter(|t| t.group == charge.group)
            else {
                return;
            };
            tally.seen += 1;
            let use_now = match charge.outcome {
                QuotaOutcome::Charged { remaining } => {
                    let burst = u64::from(tally.quota.burst);
                    burst.saturating_sub(remaining) as f64 / burst as f64
                }
                QuotaOutcome::Denied => {
                    tally.denied += 1;
                    1.0
                }
                QuotaOutcome::Uncharged => 0.0,
            };
            tally.peak_use = tally.peak_use.max(use_now);
        });
        let refused = denial.map(|d| d.group);
        if let Some(group) = refused {
            self.denied += 1;
            self.denied_by[group_index(group)] += 1;
        }
        if let Some(stopped) = request.recorded_denial {
            let reached_beyond = match refused {
                None => true,
                Some(group) => group_index(group) > group_index(stopped),
            };
            // Refused per IP or per client, the recording never read its address; refused
            // per address, it did, and the replay charges the later groups.
            let address_unread = group_index(stopped) < group_index(LimitGroup::PerEmail);
            if reached_beyond && address_unread {
                self.unknown_beyond += 1;
            }
        }
        refused
    }

    /// The settings replayed.
    pub fn settings(&self) -> &GuardSettings {
        self.replay.settings()
    }

    fn prefetch(&self, recorded: &Recorded<'_>) -> u64 {
        self.replay.prefetch(recorded)
    }
}

fn group_index(group: LimitGroup) -> usize {
    LimitGroup::ALL
        .iter()
        .position(|g| *g == group)
        .unwrap_or(0)
}

/// A request whose fate differs between the two configurations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its line in the log.
    pub line: u64,
    /// Arrival, nanoseconds since the Unix epoch.
    pub at_ns: u64,
    /// The group the proposal refuses it at, if any.
    pub proposed: Option<LimitGroup>,
    /// The group the current configuration refuses it at, if any.
    pub current: Option<LimitGroup>,
}

/// Requests to come whose limiter state is read ahead, together (see
/// [`Replay::prefetch`]); more are read once fewer than half of them are left.
const PREFETCH: usize = 16;

/// Most changed requests listed one by one (all are counted).
pub const CHANGES_LISTED: usize = 100;

/// A whole replay: the proposal, and the current configuration when comparing.
#[derive(Debug)]
pub struct Simulation {
    /// The proposed configuration's tally.
    pub proposed: Tally,
    /// The current configuration's tally, with `--compare`.
    pub current: Option<Tally>,
    /// Requests whose fate differs (with `--compare`).
    pub changed: u64,
    /// The first [`CHANGES_LISTED`] of them.
    pub changes: Vec<Change>,
    /// Requests the recording refused with 429.
    pub recorded_denied: u64,
    /// Requests that arrived more than [`REORDER_WINDOW`] before one already replayed,
    /// replayed as if at that later time.
    pub late: u64,
    /// First and last arrival replayed (nanoseconds since the Unix epoch).
    pub span: Option<(u64, u64)>,
    /// Every request's fate under the proposal, by line, when asked for.
    pub fates: Option<Vec<(u64, Option<LimitGroup>)>>,
    clients: Vec<String>,
    /// The reorder window: requests that came in arrival order (most of them, so most
    /// cost no heap operation), and those that came out of it.
    in_order: VecDeque<LoggedRequest>,
    /// How many requests at the front of `in_order` had their state read ahead.
    prefetched: usize,
    pending: BinaryHeap<Reverse<Pending>>,
    newest: u64,
    replayed_until: u64,
    /// Settings the proposal changes from the current configuration that a replay cannot
    /// model (it reads client IPs, clients and address keys from the log): their keys.
    pub unreplayed: Vec<&'static str>,
}

/// A request waiting in the reorder window, ordered by arrival (then line).
#[derive(Debug)]
struct Pending(LoggedRequest);

impl Pending {
    fn order(&self) -> (u64, u64) {
        (self.0.at_ns, self.0.line)
    }
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order().cmp(&other.order())
    }
}

impl Simulation {
    /// A replay of `proposed`, and of `current` beside it when comparing; `max_keys` as
    /// each file's `store.max_keys`.
    pub fn new(proposed: (GuardSettings, usize), current: Option<(GuardSettings, usize)>) -> Self {
        Simulation {
            proposed: Tally::new(proposed.0, proposed.1),
            current: current.map(|(settings, max_keys)| Tally::new(settings, max_keys)),
            changed: 0,
            changes: Vec::new(),
            recorded_denied: 0,
            late: 0,
            span: None,
            fates: None,
            clients: Vec::new(),
            in_order: VecDeque::new(),
            prefetched: 0,
            pending: BinaryHeap::new(),
            newest: 0,
            replayed_until: 0,
            unreplayed: Vec::new(),
        }
    }

    /// Keeps every request's fate (for tests that compare request by request).
    pub fn keep_fates(mut self) -> Self {
        self.fates = Some(Vec::new());
        self
    }

    /// Takes one logged request; it is replayed once nothing earlier can still follow.
    pub fn push(&mut self, request: LoggedRequest, clients: &[String]) {
        if clients.len() != self.clients.len() {
            self.clients = clients.to_vec();
        }
        self.newest = self.newest.max(request.at_ns);
        // Lines come in increasing order, so a request no earlier than the last one in
        // order sorts after it (arrival, then line) and the queue stays sorted.
        if self
            .in_order
            .back()
            .is_none_or(|last| request.at_ns >= last.at_ns)
        {
            self.in_order.push_back(request);
        } else {
            self.pending.push(Reverse(Pending(request)));
        }
        let window = REORDER_WINDOW.as_nanos() as u64;
        while let Some(first) = self.next_waiting() {
            if first.saturating_add(window) > self.newest {
                break;
            }
            let Some(request) = self.take_first() else {
                break;
            };
            self.replay(request);
        }
    }

    /// Replays whatever is still held; call once the log is read.
    pub fn finish(&mut self) {
        while let Some(request) = self.take_first() {
            self.replay(request);
        }
    }

    /// The arrival time of the earliest request held.
    fn next_waiting(&self) -> Option<u64> {
        let queued = self.in_order.front().map(|r| r.at_ns);
        let heaped = self.pending.peek().map(|Reverse(p)| p.0.at_ns);
        match (queued, heaped) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes the earliest request held (by arrival, then line).
    fn take_first(&mut self) -> Option<LoggedRequest> {
        let from_heap = match (self.in_order.front(), self.pending.peek()) {
            (Some(queued), Some(Reverse(heaped))) => {
                (heaped.0.at_ns, heaped.0.line) < (queued.at_ns, queued.line)
            }
            (None, Some(_)) => true,
            _ => false,
        };
        if from_heap {
            self.pending.pop().map(|Reverse(p)| p.0)
        } else {
            self.prefetch_ahead();
            self.prefetched = self.prefetched.saturating_sub(1);
            self.in_order.pop_front()
        }
    }

    /// Reads ahead the limiter state of the next requests in order, a batch at a time, so
    /// that their cache misses overlap (requests from the heap, few, are not read ahead).
    fn prefetch_ahead(&mut self) {
        if self.prefetched > PREFETCH / 2 {
            return;
        }
        let end = self.in_order.len().min(self.prefetched + PREFETCH);
        let mut read = 0;
        for request in self.in_order.range(self.prefetched..end) {
            let recorded = recorded(request, &self.clients);
            read ^= self.proposed.prefetch(&recorded);
            if let Some(current) = &self.current {
                read ^= current.prefetch(&recorded);
            }
        }
        std::hint::black_box(read);
        self.prefetched = end;
    }

    fn replay(&mut self, request: LoggedRequest) {
        if request.at_ns < self.replayed_until {
            self.late += 1;
        }
        self.replayed_until = self.replayed_until.max(request.at_ns);
        self.span = Some(match self.span {
            None => (request.at_ns, request.at_ns),
            Some((first, last)) => (first.min(request.at_ns), last.max(request.at_ns)),
        });
        if request.recorded_denial.is_some() {
            self.recorded_denied += 1;
        }
        let recorded = recorded(&request, &self.clients);
        let proposed = self.proposed.decide(&request, &recorded);
        if let Some(fates) = &mut self.fates {
            fates.push((request.line, proposed));
        }
        if let Some(current) = &mut self.current {
            let before = current.decide(&request, &recorded);
            if before != proposed {
                self.changed += 1;
                if self.changes.len() < CHANGES_LISTED {
                    self.changes.push(Change {
                        line: request.line,
                        at_ns: request.at_ns,
                        proposed,
                        current: before,
                    });
                }
            }
        }
    }
}

/// What the limiter is told of `request`.
fn recorded<'a>(request: &LoggedRequest, clients: &'a [String]) -> Recorded<'a> {
    Recorded {
        client_ip: request.client_ip,
        client_id: request
            .client
            .and_then(|i| clients.get(i as usize))
            .map(String::as_str),
        email_hash: request.email_hash,
    }
}
