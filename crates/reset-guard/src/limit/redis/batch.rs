//! Batching: the requests waiting for Redis on one thread go to the server as one script
//! call, each still decided atomically and in order; and the script's view of a settings
//! generation, prepared once per reload.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use super::global_keys::{group_micros, spread_over, GlobalKeys};
use super::keep_alive::{KeepAlive, SILENT_CHECK};
use super::settings;
use super::walk::Walker;
use crate::limit::{LimitGroup, LimitSettings, Quota};

/// Most requests decided by one script call.
pub(super) const MAX_BATCH: usize = 128;
/// Numbers the script returns per request.
pub(super) const REPLY_LEN: usize = 7;

/// One request's charges under one settings generation, and where its seven numbers go.
pub(super) struct Job {
    pub(super) specs: Arc<RedisSpecs>,
    pub(super) charges: Charges,
    pub(super) reply: Reply,
}

/// Where a job's seven numbers go.
// The walk travels inline: boxing it would cost an allocation per run of every cluster
// request, where a standalone job only moves a few words more.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Reply {
    /// To the request, whose charges the job holds whole.
    Request(oneshot::Sender<Result<[i64; REPLY_LEN], String>>),
    /// Cluster mode: into the request's walk over its groups, the job being one run of them.
    Walk(Walker),
}

impl Reply {
    /// Whether the request stopped waiting (it timed out and was answered as `on_error`
    /// says): charging it afterwards would count a request its limits never decided.
    pub(super) fn is_closed(&self) -> bool {
        match self {
            Reply::Request(request) => request.is_closed(),
            Reply::Walk(walker) => walker.is_closed(),
        }
    }

    /// When the request stops waiting, where the job knows (a cluster request's walk).
    pub(super) fn deadline(&self) -> Option<tokio::time::Instant> {
        match self {
            Reply::Request(_) => None,
            Reply::Walk(walker) => Some(walker.deadline()),
        }
    }

    pub(super) fn send(self, outcome: Result<[i64; REPLY_LEN], String>) {
        match self {
            // The request may have given up already; that is fine.
            Reply::Request(request) => drop(request.send(outcome)),
            Reply::Walk(walker) => walker.send(outcome),
        }
    }
}

impl From<oneshot::Sender<Result<[i64; REPLY_LEN], String>>> for Reply {
    fn from(request: oneshot::Sender<Result<[i64; REPLY_LEN], String>>) -> Self {
        Reply::Request(request)
    }
}

/// The script's view of one settings generation, prepared once per reload: per group, the
/// quota arguments and how the group's keys are spelled (in Cluster mode a key's group and
/// keyed hash form its hash tag).
#[derive(Debug)]
pub(crate) struct RedisSpecs {
    groups: [GroupSpec; 4],
    /// The keys the `global` group is spread over (one, unless `global_keys` says more).
    global: GlobalKeys,
}

/// A request's charges in order, without an allocation (a request has at most four).
#[derive(Debug, Clone, Copy)]
pub(super) struct Charges {
    items: [(LimitGroup, u64); 4],
    len: usize,
}

impl Charges {
    pub(super) fn new(charges: &[(LimitGroup, u64)]) -> Self {
        let mut items = [(LimitGroup::Global, 0); 4];
        items[..charges.len()].copy_from_slice(charges);
        Charges {
            items,
            len: charges.len(),
        }
    }

    pub(super) fn as_slice(&self) -> &[(LimitGroup, u64)] {
        &self.items[..self.len]
    }
}

#[derive(Debug, Default)]
pub(super) struct GroupSpec {
    /// The group's quotas, to read the script's answer by index.
    pub(super) quotas: Vec<Quota>,
    /// Quota count, then interval_us, capacity_us, shadow per quota.
    args: Vec<u64>,
    /// The CRC16 of `{prefix}:{group}:`, the start of every hash tag of the group.
    tag_crc: crc16::State<crc16::XMODEM>,
    /// What comes before and after the keyed hash's 16 hex digits in the group's keys:
    /// `{prefix}:{group}:` and nothing, or in Cluster mode `{{prefix}:{group}:` and `}`,
    /// a hash tag. A key holds every quota of its group, each named by its numbers: an
    /// unchanged quota keeps its state across reloads and replicas.
    key_parts: (Vec<u8>, Vec<u8>),
}

impl GroupSpec {
    /// Appends the group's key for the keyed hash `hash` (formatted by hand: a batch has
    /// several keys per request, and `core::fmt` was a fifth of the gateway's work for a
    /// call).
    fn key(&self, out: &mut Vec<u8>, hash: u64) {
        let (before, after) = &self.key_parts;
        out.extend_from_slice(before);
        out.extend_from_slice(&hex16(hash));
        out.extend_from_slice(after);
    }
}

/// A quota's numbers as the scripts have them: interval_us and capacity_us.
pub(super) fn micros(quota: &Quota) -> (u64, u64) {
    let interval_us = (quota.interval_ns / 1000).max(1);
    (interval_us, interval_us * u64::from(quota.burst))
}

/// The slot of the key for keyed hash `hash` whose hash tag starts with what `tag_crc`
/// has read.
fn slot_of(mut tag_crc: crc16::State<crc16::XMODEM>, hash: u64) -> u16 {
    tag_crc.update(&hex16(hash));
    tag_crc.get() % 16384
}

/// `hash` as 16 lowercase hex digits.
fn hex16(hash: u64) -> [u8; 16] {
    let mut digits = [0u8; 16];
    for (i, digit) in digits.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[((hash >> (60 - 4 * i)) & 0xf) as usize];
    }
    digits
}

impl RedisSpecs {
    /// Cluster mode: the slot of a group's keys for one keyed hash (CRC16 of the hash tag
    /// `{prefix}:{group}:{hash}`, modulo 16384, as Redis Cluster computes it).
    pub(super) fn slot(&self, group: LimitGroup, hash: u64) -> u16 {
        // The CRC of `{prefix}:{group}:` is kept; only the hash's 16 hex digits are added
        // per key, without formatting or allocating (a cluster request needs several).
        slot_of(self.group(group).tag_crc, hash)
    }

    /// `global_keys`: how many keys the `global` group is spread over (Cluster mode; see
    /// [`GlobalKeys`]).
    pub(crate) fn new(
        limits: &LimitSettings,
        prefix: &str,
        cluster: bool,
        global_keys: u16,
    ) -> Self {
        let tag_crc = |group: LimitGroup| {
            let mut tag_crc = crc16::State::<crc16::XMODEM>::new();
            tag_crc.update(format!("{prefix}:{}:", group.name()).as_bytes());
            tag_crc
        };
        let spread = spread_over(global_keys, limits.quotas(LimitGroup::Global));
        if spread < global_keys {
            tracing::warn!(
                target: "reset_guard::limit",
                global_keys,
                spread,
                "a global quota's burst is below store.redis.global_keys: the global group is spread over as many keys as the smallest burst, whose state starts afresh"
            );
        }
        let global_crc = tag_crc(LimitGroup::Global);
        let global = GlobalKeys::new(spread, |hash| slot_of(global_crc, hash));
        let groups = LimitGroup::ALL.map(|group| {
            let quotas = limits.quotas(group);
            let head = format!("{prefix}:{}", group.name());
            let tag_crc = tag_crc(group);
            let mut args = vec![quotas.len() as u64];
            for quota in quotas {
                let (interval_us, capacity_us) = group_micros(group, quota, global.count());
                args.extend([interval_us, capacity_us, u64::from(quota.shadow)]);
            }
            GroupSpec {
                quotas: quotas.to_vec(),
                args,
                tag_crc,
                key_parts: if cluster {
                    (format!("{{{head}:").into(), b"}".to_vec())
                } else {
                    (format!("{head}:").into(), Vec::new())
                },
            }
        });
        RedisSpecs { groups, global }
    }

    /// How many keys the global group is spread over.
    pub(crate) fn global_keys(&self) -> u64 {
        self.global.count()
    }

    /// `charges` with the global charge on the key its address's part of the slot range
    /// charges, when the group is spread over several (the address's charge comes just
    /// before it).
    pub(super) fn spread_global(&self, charges: &[(LimitGroup, u64)]) -> Option<Charges> {
        if self.global.count() == 1 {
            return None;
        }
        let mut spread = Charges::new(charges);
        for i in 1..spread.len {
            if let [(LimitGroup::PerEmail, address), (LimitGroup::Global, global)] =
                &mut spread.items[i - 1..=i]
            {
                *global = self
                    .global
                    .for_address(self.slot(LimitGroup::PerEmail, *address));
            }
        }
        Some(spread)
    }

    pub(super) fn group(&self, group: LimitGroup) -> &GroupSpec {
        &self.groups[group.index()]
    }

    /// The key of `group` for the keyed hash `hash`, as the script is given it.
    #[cfg(test)]
    pub(super) fn key_of(&self, group: LimitGroup, hash: u64) -> String {
        let mut key = Vec::new();
        self.group(group).key(&mut key, hash);
        String::from_utf8(key).unwrap_or_default()
    }
}

/// One script call's arguments for a batch (the layout is described at the top of
/// redis.lua): the numbers, packed into one argument, and each distinct key once.
pub(super) struct CallArgs {
    /// The number of requests, of keys passed in ARGV (0 here: the undeclared call patches
    /// it), where the first request starts and where the slot table starts, the quota
    /// sets, each request's groups (where its set starts, and its slots), then the slot
    /// table (each key's quotas); each a little-endian f64 (every value is an integer below
    /// 2^53).
    numbers: Vec<u8>,
    /// Each distinct key of the batch once, in first use order, back to back.
    keys: Vec<u8>,
    /// Where each key ends in `keys`.
    key_ends: Vec<usize>,
}

/// Where the count of keys passed in ARGV sits in the packed numbers.
const KEYS_IN_ARGV_AT: usize = 8;

/// Hashes a key's identity, its group and keyed hash, for the batch's key index: one
/// multiply per word (as rustc's FxHash). The hash is keyed already, which no client can
/// aim collisions at; std's SipHash cost about 1,000 instructions per request here.
#[derive(Default)]
struct KeyIdHasher(u64);

impl std::hash::Hasher for KeyIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Each distinct key of a batch (its group and keyed hash; the prefix and the mode are
/// the store's), by its index in the batch.
type KeyIndex = HashMap<(usize, u64), usize, std::hash::BuildHasherDefault<KeyIdHasher>>;

/// A slot of the batch (one quota's state in one key): its numbers, where they are in the
/// call's quota sets (from 1, as Lua counts), and the key's next slot.
struct Slot {
    interval_us: u64,
    capacity_us: u64,
    numbers_at: u64,
    next: Option<usize>,
}

/// A key's slots, as a list through [`Slot::next`].
#[derive(Clone, Copy)]
struct KeySlots {
    first: usize,
    last: usize,
}

impl CallArgs {
    /// The quota sets of every settings generation in the batch, once, then each
    /// request's groups and slots, then each key's slots.
    pub(super) fn new(batch: &[Job]) -> Self {
        let mut generations: Vec<&Arc<RedisSpecs>> = Vec::new();
        for job in batch {
            if !generations.iter().any(|g| Arc::ptr_eq(g, &job.specs)) {
                generations.push(&job.specs);
            }
        }
        let mut numbers = Vec::with_capacity(8 * (12 + 14 * batch.len()));
        fn push(numbers: &mut Vec<u8>, n: u64) {
            numbers.extend_from_slice(&(n as f64).to_le_bytes());
        }
        // Filled in below: where the requests and the slot table start.
        [batch.len() as u64, 0, 0, 0]
            .iter()
            .for_each(|n| push(&mut numbers, *n));
        // Per generation and group: where (from 1, as Lua counts) its quota set starts.
        let mut set_at = vec![[0u64; 4]; generations.len()];
        for (specs, at) in generations.iter().zip(&mut set_at) {
            for (spec, at) in specs.groups.iter().zip(at.iter_mut()) {
                *at = (numbers.len() / 8 + 1) as u64;
                spec.args.iter().for_each(|n| push(&mut numbers, *n));
            }
        }
        // The requests, each quota's slot numbered by first use; the slot table after them.
        let first_request = (numbers.len() / 8 + 1) as f64;
        numbers[16..24].copy_from_slice(&first_request.to_le_bytes());
        let mut keys = Vec::with_capacity(48 * 4 * batch.len());
        let mut key_ends = Vec::with_capacity(4 * batch.len());
        let mut key_slots: Vec<KeySlots> = Vec::with_capacity(4 * batch.len());
        let mut index = KeyIndex::with_capacity_and_hasher(4 * batch.len(), Default::default());
        let mut slots: Vec<Slot> = Vec::with_capacity(6 * batch.len());
        // Whether every key's slots were first seen one after another (a key that gains a
        // slot later, under another generation of a reload, needs them renumbered).
        let mut side_by_side = true;
        for job in batch {
            let generation = generations
                .iter()
                .position(|g| Arc::ptr_eq(g, &job.specs))
                .unwrap_or(0);
            push(&mut numbers, job.charges.len as u64);
            for (group, hash) in job.charges.as_slice() {
                push(&mut numbers, set_at[generation][group.index()]);
                let spec = job.specs.group(*group);
                if spec.quotas.is_empty() {
                    continue;
                }
                let key = *index.entry((group.index(), *hash)).or_insert_with(|| {
                    spec.key(&mut keys, *hash);
                    key_ends.push(keys.len());
                    key_slots.push(KeySlots {
                        first: usize::MAX,
                        last: usize::MAX,
                    });
                    key_ends.len() - 1
                });
                for (quota, numbers_of_quota) in spec.args[1..].chunks_exact(3).enumerate() {
                    let (interval_us, capacity_us) = (numbers_of_quota[0], numbers_of_quota[1]);
                    let mut at = Some(key_slots[key].first).filter(|&i| i != usize::MAX);
                    while let Some(i) = at {
                        let slot = &slots[i];
                        if (slot.interval_us, slot.capacity_us) == (interval_us, capacity_us) {
                            break;
                        }
                        at = slot.next;
                    }
                    let slot = at.unwrap_or_else(|| {
                        let new = slots.len();
                        slots.push(Slot {
                            interval_us,
                            capacity_us,
                            numbers_at: set_at[generation][group.index()] + 1 + 3 * quota as u64,
                            next: None,
                        });
                        let list = &mut key_slots[key];
                        if list.first == usize::MAX {
                            list.first = new;
                        } else {
                            side_by_side &= list.last + 1 == new;
                            slots[list.last].next = Some(new);
                        }
                        list.last = new;
                        new
                    });
                    push(&mut numbers, slot as u64 + 1);
                }
            }
        }
        if !side_by_side {
            // Each slot's number in the table, where a key's slots sit together, written
            // over the first-use numbers the requests were given.
            let mut number_of_slot = vec![0u64; slots.len()];
            let mut number = 0;
            for list in &key_slots {
                let mut at = Some(list.first);
                while let Some(i) = at {
                    number += 1;
                    number_of_slot[i] = number;
                    at = slots[i].next;
                }
            }
            let mut at = first_request as usize - 1;
            for job in batch {
                at += 1;
                for (group, _) in job.charges.as_slice() {
                    at += 1;
                    for _ in 0..job.specs.group(*group).quotas.len() {
                        let first_use = f64::from_le_bytes(
                            numbers[8 * at..8 * at + 8].try_into().unwrap_or_default(),
                        ) as usize;
                        let renumbered = number_of_slot[first_use - 1] as f64;
                        numbers[8 * at..8 * at + 8].copy_from_slice(&renumbered.to_le_bytes());
                        at += 1;
                    }
                }
            }
        }
        let slot_table = (numbers.len() / 8 + 1) as f64;
        numbers[24..32].copy_from_slice(&slot_table.to_le_bytes());
        for list in &key_slots {
            let count_at = numbers.len();
            push(&mut numbers, 0);
            let mut count = 0u32;
            let mut at = Some(list.first);
            while let Some(i) = at {
                push(&mut numbers, slots[i].numbers_at);
                count += 1;
                at = slots[i].next;
            }
            numbers[count_at..count_at + 8].copy_from_slice(&f64::from(count).to_le_bytes());
        }
        CallArgs {
            numbers,
            keys,
            key_ends,
        }
    }

    /// A call deciding no request that declares `keys`, which the script reads and leaves
    /// as they are: the probe's. A managed service's proxy routes a script call by its keys
    /// and refuses one that declares none (ElastiCache Serverless: `Lua scripts without any
    /// input keys are not supported`), or whose keys it cannot route together.
    pub(super) fn for_nothing(keys: &[String]) -> Self {
        // No request, the keys declared, the requests and the slot table both at 5 (from
        // 1, as Lua counts); the table: each key, with no slot.
        let numbers = [0.0f64, 0.0, 5.0, 5.0]
            .into_iter()
            .chain(keys.iter().map(|_| 0.0))
            .flat_map(f64::to_le_bytes)
            .collect();
        let key_ends = keys
            .iter()
            .scan(0, |end, key| {
                *end += key.len();
                Some(*end)
            })
            .collect();
        CallArgs {
            numbers,
            keys: keys.concat().into_bytes(),
            key_ends,
        }
    }

    /// The distinct keys, in order.
    pub(super) fn keys(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.key_ends.iter().copied());
        starts
            .zip(&self.key_ends)
            .map(|(start, end)| &self.keys[start..*end])
    }

    /// `EVALSHA` with the keys declared (they must share one slot in a cluster).
    pub(super) fn declared(&self, sha: &str) -> redis::Cmd {
        use redis::RedisWrite;
        let mut command = self.command(sha);
        command.arg(self.key_ends.len());
        for key in self.keys() {
            command.write_arg(key);
        }
        command.write_arg(&self.numbers);
        command
    }

    /// `EVALSHA` with the keys passed as arguments, for the script that may touch several
    /// slots of one cluster node.
    pub(super) fn undeclared(&self, sha: &str) -> redis::Cmd {
        use redis::RedisWrite;
        use std::io::Write;
        let mut command = self.command(sha);
        command.write_arg(b"0");
        // The numbers as they are but for how many keys follow them (written in place, not
        // copied first).
        {
            let mut numbers = command.writer_for_next_arg();
            let key_count = (self.key_ends.len() as f64).to_le_bytes();
            let written = numbers
                .write_all(&self.numbers[..KEYS_IN_ARGV_AT])
                .and_then(|()| numbers.write_all(&key_count))
                .and_then(|()| numbers.write_all(&self.numbers[KEYS_IN_ARGV_AT + 8..]));
            debug_assert!(written.is_ok(), "a command's buffer takes any write");
        }
        for key in self.keys() {
            command.write_arg(key);
        }
        command
    }

    /// `EVALSHA` and the script's hash, in a command sized for the rest of the call: its
    /// buffers grown once rather than as each argument is written.
    fn command(&self, sha: &str) -> redis::Cmd {
        use redis::RedisWrite;
        let mut command = redis::Cmd::with_capacity(
            4 + self.key_ends.len(),
            "EVALSHA".len() + sha.len() + 20 + self.keys.len() + self.numbers.len(),
        );
        command.write_arg(b"EVALSHA");
        command.write_arg(sha.as_bytes());
        command
    }
}

/// Gathers whatever requests are waiting into one script call, so a busy gateway makes
/// one round trip for many requests; each request is still decided atomically, in order.
/// While idle, the connection is kept alive in the background ([`KeepAlive`]).
///
/// `remake` makes the connection anew: the Redis client remakes one only after an I/O
/// error, so one whose making failed otherwise (`AUTH` refused while an ACL user was off,
/// a server still loading its data) would fail every call after, though Redis serves
/// again and the probe, over a connection of its own, finds it serving; and one held by a
/// reply that never ends (a declared length it never sends) would wait for it for good.
pub(super) async fn run_batches(
    mut queue: mpsc::Receiver<Job>,
    mut connection: ConnectionManager,
    remake: impl Fn() -> Option<ConnectionManager>,
    script: Arc<redis::Script>,
    timeout: Duration,
) {
    let mut made = tokio::time::Instant::now();
    let mut keep_alive = KeepAlive::new();
    // Whether the last call went unanswered (late, or its connection broke).
    let mut unanswered = false;
    let mut refusal = Refusal::default();
    while let Some(first) = keep_alive
        .next_job(&mut queue, Some(&connection), timeout)
        .await
    {
        // The first job's sender woke this task, which the runtime may run next, before
        // the other requests ready to run have sent theirs: let them.
        tokio::task::yield_now().await;
        let mut batch = gather(first, &mut queue);
        let silent = keep_alive.liveness.silent();
        if silent || unanswered {
            // A new connection, or nothing has answered for a while (the background PINGs
            // failed: Redis restarted, or closed the connection): a PING makes the
            // connection, or finds out and has the manager make a new one, before a
            // script is sent that a closed connection would fail (given the time making a
            // connection takes; the first request on a new one waits for that too). A
            // script call itself is never made twice: a connection that closes after it
            // was written may have run it.
            //
            // And after a call that got no answer: Redis runs every call it has received,
            // however late, so calls sent to a Redis that stalled would all charge their
            // requests once it resumes, though each was answered as `on_error` says. Until
            // a PING comes back (behind the late call, on its connection, or on the one
            // made after it broke), nothing is sent; the requests waiting meanwhile are
            // answered as `on_error` says, and charged nowhere.
            if let Some(why) = refusal.recent() {
                // A PING failed a moment ago: these fail at once, rather than each batch
                // making a connection attempt of its own (thousands a second against a
                // closed port).
                answer(batch, Err(why));
                continue;
            }
            let until = tokio::time::Instant::now() + settings::connect_timeout(timeout);
            let mut pinged = ping_by(connection.clone(), until).await;
            let answered = matches!(pinged, Ok(Ok(())));
            if !answered && silent && made.elapsed() >= SILENT_CHECK {
                // No answer on a connection silent this long (a reply that never ends
                // holds it, or its making failed in a way the client does not retry):
                // made anew, at most once a second, and tried.
                if let Some(fresh) = remake() {
                    (connection, made) = (fresh, tokio::time::Instant::now());
                    pinged = ping_by(connection.clone(), until).await;
                }
            } else if refused_at_once(&pinged) {
                // A broken connection, which the client has begun to make anew: tried once
                // more on that one.
                pinged = ping_by(connection.clone(), until).await;
            }
            batch.retain(|job| !job.reply.is_closed());
            match pinged {
                Ok(Ok(())) => {
                    keep_alive.liveness.answered();
                    unanswered = false;
                }
                failed => {
                    let why = why_not(failed, unanswered);
                    answer(batch, Err(why.clone()));
                    refusal.record(why);
                    continue;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        // One call at a time: Redis runs scripts one after another anyway, and whatever
        // arrives meanwhile rides in the next batch.
        keep_alive.sent();
        unanswered = !call(batch, &mut connection, &script, timeout).await;
        if !unanswered {
            keep_alive.liveness.answered();
        }
    }
}

/// Why a request was not sent to Redis: an earlier call on its connection has had no
/// answer yet.
pub(super) const LATE_CALL: &str = "no answer yet to an earlier call";

/// What a `PING` over `connection` got by `until`.
pub(super) type Pinged = Result<redis::RedisResult<()>, tokio::time::error::Elapsed>;

/// A `PING` over `connection`, answered by `until` or not.
pub(super) async fn ping_by(
    mut connection: ConnectionManager,
    until: tokio::time::Instant,
) -> Pinged {
    tokio::time::timeout_at(until, super::keep_alive::ping(&mut connection)).await
}

/// Whether a `PING` failed with an error of the client's own before its deadline (a broken
/// connection, the client's response timeout, or a failure it kept from an attempt to make
/// the connection while Redis was away): worth once more, on the connection the client
/// makes anew after it.
pub(super) fn refused_at_once(pinged: &Pinged) -> bool {
    matches!(pinged, Ok(Err(_)))
}

/// Why requests were not sent after a `PING` that failed: its error, or, without one, that
/// an earlier call is still `unanswered` (or that the `PING` itself was not).
pub(super) fn why_not(failed: Pinged, unanswered: bool) -> String {
    match failed {
        Ok(Err(error)) if !error.is_timeout() => error.to_string(),
        _ if unanswered => LATE_CALL.to_owned(),
        _ => "timed out".to_owned(),
    }
}

/// How long after a failed `PING` the requests of a connection fail at once, without
/// another: as often as the probe tries while Redis is away.
const REFUSAL_PAUSE: Duration = Duration::from_millis(250);

/// The last `PING` of a connection that failed, and why.
#[derive(Debug, Default)]
pub(super) struct Refusal(Option<(tokio::time::Instant, String)>);

impl Refusal {
    pub(super) fn record(&mut self, why: String) {
        self.0 = Some((tokio::time::Instant::now(), why));
    }

    /// Why, if it failed within [`REFUSAL_PAUSE`].
    pub(super) fn recent(&self) -> Option<String> {
        let (at, why) = self.0.as_ref()?;
        (at.elapsed() < REFUSAL_PAUSE).then(|| why.clone())
    }
}

/// The first job and whatever else is waiting, up to [`MAX_BATCH`].
pub(super) fn gather(first: Job, queue: &mut mpsc::Receiver<Job>) -> Vec<Job> {
    gather_from(first, || queue.try_recv().ok())
}

/// The first job and what `next` has waiting, up to [`MAX_BATCH`], less the jobs whose
/// requests stopped waiting (they timed out and were answered as `on_error` says):
/// charging them afterwards would count requests their limits never decided.
fn gather_from(first: Job, mut next: impl FnMut() -> Option<Job>) -> Vec<Job> {
    let mut batch = Vec::new();
    let mut job = Some(first);
    while let Some(waiting) = job {
        if !waiting.reply.is_closed() {
            batch.push(waiting);
        }
        if batch.len() == MAX_BATCH {
            break;
        }
        job = next();
    }
    batch
}

/// One script call deciding `batch`, and each job's seven numbers (or the error) sent back;
/// whether Redis answered (with the numbers, or an error of its own).
pub(super) async fn call(
    batch: Vec<Job>,
    connection: &mut impl redis::aio::ConnectionLike,
    script: &redis::Script,
    timeout: Duration,
) -> bool {
    let args = CallArgs::new(&batch);
    let command = args.declared(script.get_hash());
    let mut reply =
        tokio::time::timeout(timeout, command.query_async::<redis::Value>(connection)).await;
    if let Ok(Err(error)) = &reply {
        if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) {
            // A server that lost its scripts (restarted, or `SCRIPT FLUSH`): load it
            // again. Each exchange is given the timeout a call is.
            reply = match tokio::time::timeout(timeout, script.load_async(connection)).await {
                Ok(Ok(_)) => {
                    let again = command.query_async::<redis::Value>(connection);
                    tokio::time::timeout(timeout, again).await
                }
                Ok(Err(error)) => Ok(Err(error)),
                Err(late) => Err(late),
            };
        }
    }
    let (outcome, answered) = match reply {
        Ok(Ok(reply)) => (numbers(reply), true),
        Ok(Err(error)) => {
            let answered = matches!(error.kind(), redis::ErrorKind::Server(_));
            (Err(error.to_string()), answered)
        }
        Err(_) => (Err("timed out".to_owned()), false),
    };
    answer(batch, outcome);
    answered
}

/// The script run for no request, as the probe runs it, declaring the probe's `keys` (read,
/// not written) as a request's call declares its own: a server that answers `PING` but
/// refuses the script (an ACL without `EVALSHA`, `SCRIPT LOAD` or the commands the script
/// calls, a proxy that cannot route the keys together) fails every request, so it does not
/// count as serving.
pub(super) async fn run_for_nothing(
    connection: &mut impl redis::aio::ConnectionLike,
    script: &redis::Script,
    timeout: Duration,
    keys: &[String],
) -> Result<(), String> {
    let command = CallArgs::for_nothing(keys).declared(script.get_hash());
    let answer = script_answer(connection, script, &command, timeout).await?;
    answered_for_nothing(&answer.map_err(|e| format!("the rate-limit script: {e}"))?)
}

/// `command`, a call of `script`, which is loaded if the server lost it (then called again):
/// Redis's own answer (a refused load's, if it was), or why none came within `timeout` (each
/// exchange).
pub(super) async fn script_answer(
    connection: &mut impl redis::aio::ConnectionLike,
    script: &redis::Script,
    command: &redis::Cmd,
    timeout: Duration,
) -> Result<redis::RedisResult<redis::Value>, String> {
    let late = |_| format!("no answer within {timeout:?}");
    let reply = tokio::time::timeout(timeout, command.query_async::<redis::Value>(connection))
        .await
        .map_err(late)?;
    match reply {
        Err(error)
            if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            let load = tokio::time::timeout(timeout, script.load_async(connection))
                .await
                .map_err(late)?;
            if let Err(refused) = load {
                return Ok(Err(refused));
            }
            let again = command.query_async::<redis::Value>(connection);
            tokio::time::timeout(timeout, again).await.map_err(late)
        }
        reply => Ok(reply),
    }
}

/// Whether `reply` is the script's answer to a call for no request: nothing, or `[-1]`
/// where a key passed as an argument is not served there (its slot is moving).
pub(super) fn answered_for_nothing(reply: &redis::Value) -> Result<(), String> {
    match reply {
        redis::Value::BulkString(bytes) if bytes.is_empty() => Ok(()),
        redis::Value::Array(values) if values[..] == [redis::Value::Int(-1)] => Ok(()),
        _ => Err("the rate-limit script answered something unexpected".to_owned()),
    }
}

/// Writes the probe's own key (`PSETEX`, which the gateway's ACL user may run on its
/// keys; it expires in ten seconds): a server that refuses writes (`OOM` at `maxmemory`
/// under `noeviction`, a replica) fails every request, so it does not count as serving.
pub(super) async fn write_probe(
    connection: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> Result<(), String> {
    write_probe_answer(connection, key)
        .await
        .map_err(|e| format!("a write: {e}"))
}

/// [`write_probe`] with Redis's own error, for a caller that tells a redirect apart.
pub(super) async fn write_probe_answer(
    connection: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> redis::RedisResult<()> {
    redis::cmd("PSETEX")
        .arg(key)
        .arg(10_000)
        .arg(1)
        .query_async::<()>(connection)
        .await
}

/// Whether a cluster node sent the command elsewhere (`MOVED`, `ASK`): its slot is moving.
pub(super) fn redirected(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        error.kind(),
        ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask)
    )
}

/// The script's answer: its numbers packed as little-endian f64 in one string (one bulk
/// reply to read rather than seven integers per request), or `[-1]` from a call that found
/// a key not served where it ran.
pub(super) fn numbers(reply: redis::Value) -> Result<Vec<i64>, String> {
    match reply {
        redis::Value::BulkString(bytes) if bytes.len() % 8 == 0 => Ok(bytes
            .chunks_exact(8)
            .map(|n| f64::from_le_bytes(n.try_into().unwrap_or_default()) as i64)
            .collect()),
        redis::Value::Array(_) => redis::from_redis_value(reply).map_err(|e| e.to_string()),
        _ => Err("unexpected reply from the rate-limit script".to_owned()),
    }
}

/// Sends each job of a batch its seven numbers from the script's reply, or the error.
pub(super) fn answer(batch: Vec<Job>, outcome: Result<Vec<i64>, String>) {
    let outcome = match outcome {
        Ok(values) if values.len() != REPLY_LEN * batch.len() => {
            Err("unexpected reply from the rate-limit script".to_owned())
        }
        other => other,
    };
    for (i, job) in batch.into_iter().enumerate() {
        let reply = match &outcome {
            Ok(values) => {
                let mut one = [0; REPLY_LEN];
                one.copy_from_slice(&values[i * REPLY_LEN..(i + 1) * REPLY_LEN]);
                Ok(one)
            }
            Err(error) => Err(error.clone()),
        };
        job.reply.send(reply);
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_redirect_is_told_from_a_failure() {
        let error = |reply: &[u8]| {
            let value = redis::parse_redis_value(reply).unwrap();
            value.extract_error().unwrap_err()
        };
        assert!(super::redirected(&error(b"-MOVED 3999 127.0.0.1:6381\r\n")));
        assert!(super::redirected(&error(b"-ASK 3999 127.0.0.1:6381\r\n")));
        assert!(!super::redirected(&error(
            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
        )));
    }
    use super::*;

    fn limits(per_email: &[(u32, u64)]) -> LimitSettings {
        let quota = |requests, secs| Quota::new(requests, Duration::from_secs(secs), None, false);
        let mut groups: [Vec<Quota>; 4] = Default::default();
        groups[LimitGroup::PerIp.index()] = vec![quota(10, 60).unwrap()];
        groups[LimitGroup::PerEmail.index()] = per_email
            .iter()
            .map(|(requests, secs)| quota(*requests, *secs).unwrap())
            .collect();
        LimitSettings::of_groups(groups)
    }

    fn job(specs: &Arc<RedisSpecs>, ip: u64, email: u64) -> Job {
        Job {
            specs: specs.clone(),
            charges: Charges::new(&[(LimitGroup::PerIp, ip), (LimitGroup::PerEmail, email)]),
            reply: oneshot::channel().0.into(),
        }
    }

    #[test]
    fn a_request_that_stopped_waiting_is_not_sent() {
        let specs = Arc::new(RedisSpecs::new(&limits(&[(3, 3600)]), "rg", false, 1));
        let (sender, mut queue) = mpsc::channel(8);
        let mut waiting = Vec::new();
        for i in 0..4u64 {
            let (reply, answer) = oneshot::channel();
            let job = Job {
                specs: specs.clone(),
                charges: Charges::new(&[(LimitGroup::PerIp, i)]),
                reply: reply.into(),
            };
            // The first and third requests timed out (their answers are dropped).
            if i % 2 == 1 {
                waiting.push(answer);
            }
            sender.try_send(job).unwrap();
        }
        let first = queue.try_recv().unwrap();
        let batch = gather(first, &mut queue);
        let sent: Vec<u64> = batch
            .iter()
            .map(|job| job.charges.as_slice()[0].1)
            .collect();
        assert_eq!(sent, [1, 3]);
    }

    /// A request's slots, each as (its key, interval_us, capacity_us).
    type Used = Vec<(String, u64, u64)>;

    /// The keys, the slot table and each request's slots of a call, read as the script
    /// reads them (checking that each slot is the quota its set names).
    fn read(args: &CallArgs) -> (Vec<String>, Used, Vec<Used>) {
        let all_keys: Vec<String> = args
            .keys()
            .map(|key| String::from_utf8(key.to_vec()).unwrap())
            .collect();
        let nums: Vec<u64> = args
            .numbers
            .chunks_exact(8)
            .map(|n| f64::from_le_bytes(n.try_into().unwrap()) as u64)
            .collect();
        // Lua counts from 1.
        let at = |i: u64| nums[usize::try_from(i).unwrap() - 1];
        assert_eq!(nums[1], 0, "keys declared");
        // The slot table: per key its slots (where a set holds the quota's interval_us and
        // capacity_us), numbered from 1 in order, each key's side by side.
        let mut slots = Vec::new();
        let mut next = at(4);
        for key in &all_keys {
            let count = at(next);
            next += 1;
            for _ in 0..count {
                let numbers_at = at(next);
                slots.push((key.clone(), at(numbers_at), at(numbers_at + 1)));
                next += 1;
            }
        }
        assert_eq!(
            next as usize,
            nums.len() + 1,
            "the slot table ends the numbers"
        );
        let mut next = at(3);
        let mut requests = Vec::new();
        for _ in 0..nums[0] {
            let groups = at(next);
            next += 1;
            let mut used = Vec::new();
            for _ in 0..groups {
                let set = at(next);
                let quotas = at(set);
                for q in 0..quotas {
                    // The set holds interval_us, capacity_us and shadow per quota: the
                    // slot is that quota's.
                    let slot = &slots[usize::try_from(at(next + 1 + q)).unwrap() - 1];
                    assert_eq!((slot.1, slot.2), (at(set + 1 + 3 * q), at(set + 2 + 3 * q)));
                    used.push(slot.clone());
                }
                next += 1 + quotas;
            }
            requests.push(used);
        }
        assert_eq!(next, at(4), "the slot table follows the requests");
        (all_keys, slots, requests)
    }

    #[test]
    fn each_distinct_key_is_passed_once_with_its_slots_and_every_request_points_at_its_own() {
        // A reload between two requests of one batch: the per-IP quota is unchanged, the
        // per-email group gains a daily quota (one key per group and address still).
        let old = Arc::new(RedisSpecs::new(&limits(&[(3, 3600)]), "rg", false, 1));
        let new = Arc::new(RedisSpecs::new(
            &limits(&[(3, 3600), (5, 86_400)]),
            "rg",
            false,
            1,
        ));
        let batch = [job(&old, 1, 7), job(&new, 1, 7), job(&new, 2, 7)];
        let (all_keys, slots, requests) = read(&CallArgs::new(&batch));
        let [first, second, third] = &requests[..] else {
            panic!("{requests:?}")
        };
        assert_eq!((first.len(), second.len(), third.len()), (2, 3, 3));
        // The unchanged per-IP quota and the unchanged per-email quota are the same slots
        // in both generations; the daily quota is a second slot of the same key.
        assert_eq!(first[..2], second[..2]);
        assert_eq!(second[1].0, second[2].0, "one key for the group");
        assert_ne!(second[0], third[0], "another address");
        assert_eq!(second[1..], third[1..], "the same mailbox");
        // Each key once: per-IP for two addresses, one per-email key; four slots.
        assert_eq!(all_keys.len(), 3, "{all_keys:?}");
        assert_eq!(slots.len(), 4, "{slots:?}");
        assert!(
            all_keys.contains(&format!("rg:per_email:{:016x}", 7)),
            "{all_keys:?}"
        );

        // The daily quota's slot first seen after another key's: the mailbox's two slots
        // are still side by side in the table, and each request points at its own.
        let batch = [job(&old, 1, 7), job(&old, 2, 8), job(&new, 1, 7)];
        let (all_keys, slots, requests) = read(&CallArgs::new(&batch));
        assert_eq!(all_keys.len(), 4, "{all_keys:?}");
        assert_eq!(slots.len(), 5, "{slots:?}");
        assert_eq!(requests[0][..2], requests[2][..2]);
        assert_eq!(requests[2][1].0, requests[2][2].0, "one key for the group");
        assert_eq!(requests[2][2].1, 86_400_000_000 / 5, "the daily quota");
    }

    /// The largest call there is: a full batch, every group with the most quotas, every key
    /// new and then every key holding all four: the script reads all its numbers (Lua
    /// returns at most about 8,000 values from one call) and decides every request.
    #[test]
    fn a_full_batch_of_the_most_quotas_is_decided_whole() {
        let quota = |requests, secs| Quota::new(requests, Duration::from_secs(secs), None, false);
        let four: Vec<Quota> = (1..=4)
            .map(|q| quota(1000 * q, 3600 * u64::from(q)).unwrap())
            .collect();
        let limits = LimitSettings::of_groups([four.clone(), four.clone(), four.clone(), four]);
        let specs = Arc::new(RedisSpecs::new(&limits, "rg", false, 1));
        let batch = || -> Vec<Job> {
            (0..MAX_BATCH as u64)
                .map(|i| Job {
                    specs: specs.clone(),
                    charges: Charges::new(&[
                        (LimitGroup::PerIp, 1000 + i),
                        (LimitGroup::PerClient, 2000 + i),
                        (LimitGroup::PerEmail, 3000 + i),
                        (LimitGroup::Global, 0),
                    ]),
                    reply: oneshot::channel().0.into(),
                })
                .collect()
        };
        let server = test_support::RedisServer::start();
        let mut connection = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let script = redis::Script::new(include_str!("../redis.lua"));
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(include_str!("../redis.lua"))
            .query(&mut connection)
            .unwrap();
        for round in ["new keys", "every key holding four quotas"] {
            let args = CallArgs::new(&batch());
            assert!(args.numbers.len() / 8 > 4000, "{round}: read in parts");
            let reply = args
                .declared(script.get_hash())
                .query::<redis::Value>(&mut connection)
                .unwrap_or_else(|e| panic!("{round}: {e}"));
            let values = numbers(reply).unwrap();
            assert_eq!(values.len(), REPLY_LEN * MAX_BATCH, "{round}");
            for answer in values.chunks_exact(REPLY_LEN) {
                assert_eq!(answer[0], 0, "{round}: admitted: {answer:?}");
            }
        }
        let email_key = format!("rg:per_email:{:016x}", 3000);
        assert_eq!(server.quota_states(&email_key).len(), 4);
    }

    #[test]
    fn a_group_without_quotas_has_no_key() {
        let specs = Arc::new(RedisSpecs::new(&limits(&[]), "rg", false, 1));
        let (reply, _) = oneshot::channel();
        let job = Job {
            specs,
            charges: Charges::new(&[(LimitGroup::PerEmail, 7), (LimitGroup::PerIp, 1)]),
            reply: reply.into(),
        };
        let args = CallArgs::new(&[job]);
        let keys: Vec<&[u8]> = args.keys().collect();
        assert_eq!(keys, [b"rg:per_ip:0000000000000001"]);
    }

    #[test]
    fn a_slot_is_the_crc16_of_the_hash_tag_as_redis_computes_it() {
        let specs = RedisSpecs::new(&LimitSettings::of_groups(Default::default()), "rg", true, 1);
        for hash in [0, 1, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef] {
            for group in LimitGroup::ALL {
                let tag = format!("rg:{}:{hash:016x}", group.name());
                let expected = crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % 16384;
                assert_eq!(specs.slot(group, hash), expected, "{tag}");
            }
        }
        // Redis's own example (CLUSTER KEYSLOT): the same CRC16.
        assert_eq!(
            crc16::State::<crc16::XMODEM>::calculate(b"123456789"),
            0x31c3
        );
    }
}
