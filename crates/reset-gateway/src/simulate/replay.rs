//! Replays logged requests, in arrival order, through one or two limit configurations
//! (reset-guard's [`Replay`]: the gateway's own in-memory limiter on a clock set from the
//! log) and tallies, per quota, what each would have done.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use reset_guard::internals::{Charge, QuotaOutcome, Recorded, Replay};
use reset_guard::{GuardSettings, LimitGroup, Quota};

use super::distinct::DistinctKeys;
use super::reader::LoggedRequest;
use super::summary::Expansion;

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
    /// Whom it was for, as its line says: the client IP, the client, the address key.
    pub client_ip: std::net::IpAddr,
    pub client_id: Option<String>,
    pub email_hash: Option<u64>,
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
    /// First and last arrival replayed (nanoseconds since the Unix epoch).
    pub span: Option<(u64, u64)>,
    /// Every request's fate under the proposal, by line, when asked for.
    pub fates: Option<Vec<(u64, Option<LimitGroup>)>>,
    clients: Vec<String>,
    /// Every line's request, held until the log ends: a line is written when its request
    /// finishes, so it may follow lines of requests that arrived after it, and the logs of
    /// several replicas may come one after another (`kubectl logs -l` prints pod by pod).
    /// They are sorted by arrival then, and replayed from the front. A summary line is held
    /// as one (about 80 bytes), its other requests made as the replay reaches them.
    in_order: VecDeque<LoggedRequest>,
    /// The summary lines whose first request was replayed and whose others are not all.
    expanding: BinaryHeap<Reverse<Expanding>>,
    /// How many requests at the front of `in_order` had their state read ahead.
    prefetched: usize,
    /// Settings the proposal changes from the current configuration that a replay cannot
    /// model (it reads client IPs, clients and address keys from the log): their keys.
    pub unreplayed: Vec<&'static str>,
}

/// A summary line's requests still to replay, ordered by the next one's arrival (then
/// line).
#[derive(Debug)]
struct Expanding(Expansion);

impl PartialEq for Expanding {
    fn eq(&self, other: &Self) -> bool {
        self.0.order() == other.0.order()
    }
}

impl Eq for Expanding {}

impl PartialOrd for Expanding {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Expanding {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.order().cmp(&other.0.order())
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
            span: None,
            fates: None,
            clients: Vec::new(),
            in_order: VecDeque::new(),
            expanding: BinaryHeap::new(),
            prefetched: 0,
            unreplayed: Vec::new(),
        }
    }

    /// Keeps every request's fate (for tests that compare request by request).
    pub fn keep_fates(mut self) -> Self {
        self.fates = Some(Vec::new());
        self
    }

    /// Takes one logged request; it is replayed by [`finish`](Self::finish), in arrival
    /// order.
    pub fn push(&mut self, request: LoggedRequest, clients: &[String]) {
        if clients.len() != self.clients.len() {
            self.clients = clients.to_vec();
        }
        self.in_order.push_back(request);
    }

    /// Replays every request taken, by arrival (then line); call once the log is read.
    /// The sort is stable and takes runs already in order as they are (one replica's log
    /// is nearly sorted), so logs one after another cost a merge of them.
    pub fn finish(&mut self) {
        self.in_order
            .make_contiguous()
            .sort_by_key(|request| (request.at_ns, request.line));
        while let Some(request) = self.take_first() {
            self.replay(request);
        }
    }

    /// Takes the earliest request held (by arrival, then line), the next of a summary
    /// line's or a line's own.
    fn take_first(&mut self) -> Option<LoggedRequest> {
        let from_summary = match (self.in_order.front(), self.expanding.peek()) {
            (Some(line), Some(Reverse(summary))) => summary.0.order() < (line.at_ns, line.line),
            (None, Some(_)) => true,
            _ => false,
        };
        if from_summary {
            let Reverse(Expanding(mut expansion)) = self.expanding.pop()?;
            let request = expansion.next();
            if !expansion.is_done() {
                self.expanding.push(Reverse(Expanding(expansion)));
            }
            return request;
        }
        self.prefetch_ahead();
        self.prefetched = self.prefetched.saturating_sub(1);
        let request = self.in_order.pop_front()?;
        if let Some(rest) = Expansion::after(&request) {
            self.expanding.push(Reverse(Expanding(rest)));
        }
        Some(request)
    }

    /// Reads ahead the limiter state of the next requests in order, a batch at a time, so
    /// that their cache misses overlap.
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
                        client_ip: recorded.client_ip,
                        client_id: recorded.client_id.map(str::to_owned),
                        email_hash: recorded.email_hash,
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
