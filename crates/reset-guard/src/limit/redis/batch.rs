//! Batching: the requests waiting for Redis on one thread go to the server as one script
//! call, each still decided atomically and in order; and the script's view of a settings
//! generation, prepared once per reload.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use crate::limit::{LimitGroup, LimitSettings, Quota};

/// Most requests decided by one script call.
pub(super) const MAX_BATCH: usize = 128;
/// Numbers the script returns per request.
pub(super) const REPLY_LEN: usize = 7;

/// One request's charges under one settings generation, and where its six numbers go.
pub(super) struct Job {
    pub(super) specs: Arc<RedisSpecs>,
    pub(super) charges: Charges,
    pub(super) reply: oneshot::Sender<Result<[i64; REPLY_LEN], String>>,
}

/// The script's view of one settings generation, prepared once per reload: per group, the
/// quota arguments and how each quota's keys are spelled (in Cluster mode each key's group
/// and keyed hash form its hash tag, so every quota of one group and key shares a slot).
#[derive(Debug)]
pub(crate) struct RedisSpecs {
    groups: [GroupSpec; 4],
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
    /// Per quota, what comes before and after the keyed hash's 16 hex digits in its key:
    /// `{prefix}:{group}:{quota}:` and nothing, or in Cluster mode `{{prefix}:{group}:` and
    /// `}:{quota}`, whose hash tag puts every quota of one group and key in one slot. The
    /// quota (`{interval_us}.{capacity_us}`) is part of the key: a changed quota starts
    /// fresh, an unchanged one keeps its state across reloads and replicas.
    key_parts: Vec<(Vec<u8>, Vec<u8>)>,
}

impl GroupSpec {
    /// Appends the key of quota `q` for the keyed hash `hash` (formatted by hand: a batch
    /// has several keys per request, and `core::fmt` was a fifth of the gateway's work
    /// for a call).
    fn key(&self, out: &mut Vec<u8>, q: usize, hash: u64) {
        let (before, after) = &self.key_parts[q];
        out.extend_from_slice(before);
        out.extend_from_slice(&hex16(hash));
        out.extend_from_slice(after);
    }
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
        let mut crc = self.group(group).tag_crc;
        crc.update(&hex16(hash));
        crc.get() % 16384
    }

    pub(crate) fn new(limits: &LimitSettings, prefix: &str, cluster: bool) -> Self {
        let groups = LimitGroup::ALL.map(|group| {
            let quotas = limits.quotas(group);
            let head = format!("{prefix}:{}", group.name());
            let mut tag_crc = crc16::State::<crc16::XMODEM>::new();
            tag_crc.update(head.as_bytes());
            tag_crc.update(b":");
            let mut spec = GroupSpec {
                quotas: quotas.to_vec(),
                args: vec![quotas.len() as u64],
                tag_crc,
                key_parts: Vec::new(),
            };
            for quota in quotas {
                let interval_us = (quota.interval_ns / 1000).max(1);
                let capacity_us = interval_us * u64::from(quota.burst);
                spec.args
                    .extend([interval_us, capacity_us, u64::from(quota.shadow)]);
                let quota = format!("{interval_us}.{capacity_us}");
                spec.key_parts.push(if cluster {
                    (format!("{{{head}:").into(), format!("}}:{quota}").into())
                } else {
                    (format!("{head}:{quota}:").into(), Vec::new())
                });
            }
            spec
        });
        RedisSpecs { groups }
    }

    pub(super) fn group(&self, group: LimitGroup) -> &GroupSpec {
        &self.groups[group.index()]
    }
}

/// One script call's arguments for a batch (the layout is described at the top of
/// redis.lua): the numbers, packed into one argument, and each distinct key once.
pub(super) struct CallArgs {
    /// The number of requests, of keys passed in ARGV (0 here: the undeclared call patches
    /// it) and where the first request starts, the quota sets, then each request's groups
    /// (where its set starts, and its keys' indices); each a little-endian f64 (every value
    /// is an integer below 2^53).
    numbers: Vec<u8>,
    /// Each distinct key of the batch once, in first use order, back to back.
    keys: Vec<u8>,
    /// Where each key ends in `keys`.
    key_ends: Vec<usize>,
}

/// Where the count of keys passed in ARGV sits in the packed numbers.
const KEYS_IN_ARGV_AT: usize = 8;

/// A key's identity: its group, its quota's interval_us and capacity_us, and the keyed
/// hash (the prefix and the mode are the store's). Two settings generations with the same
/// quota share its keys.
type KeyId = (usize, u64, u64, u64);

/// Hashes a [`KeyId`] for the batch's key index: one multiply per word (as rustc's
/// FxHash). Its last word is a keyed hash of the client's key already, which no client can
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

type KeyIndex = HashMap<KeyId, u64, std::hash::BuildHasherDefault<KeyIdHasher>>;

impl CallArgs {
    /// The quota sets of every settings generation in the batch, once, then each
    /// request's groups and keys.
    pub(super) fn new(batch: &[Job]) -> Self {
        let mut generations: Vec<&Arc<RedisSpecs>> = Vec::new();
        for job in batch {
            if !generations.iter().any(|g| Arc::ptr_eq(g, &job.specs)) {
                generations.push(&job.specs);
            }
        }
        let mut numbers = Vec::with_capacity(8 * (8 + 10 * batch.len()));
        fn push(numbers: &mut Vec<u8>, n: u64) {
            numbers.extend_from_slice(&(n as f64).to_le_bytes());
        }
        // Filled in below: where the first request starts.
        let header = [batch.len() as u64, 0, 0];
        header.iter().for_each(|n| push(&mut numbers, *n));
        // Per generation and group: where (from 1, as Lua counts) its quota set starts.
        let mut set_at = vec![[0u64; 4]; generations.len()];
        for (specs, at) in generations.iter().zip(&mut set_at) {
            for (spec, at) in specs.groups.iter().zip(at.iter_mut()) {
                *at = (numbers.len() / 8 + 1) as u64;
                spec.args.iter().for_each(|n| push(&mut numbers, *n));
            }
        }
        let first_request = (numbers.len() / 8 + 1) as f64;
        numbers[16..24].copy_from_slice(&first_request.to_le_bytes());
        let mut keys = Vec::with_capacity(64 * 4 * batch.len());
        let mut key_ends = Vec::with_capacity(4 * batch.len());
        let mut index = KeyIndex::with_capacity_and_hasher(4 * batch.len(), Default::default());
        for job in batch {
            let generation = generations
                .iter()
                .position(|g| Arc::ptr_eq(g, &job.specs))
                .unwrap_or(0);
            push(&mut numbers, job.charges.len as u64);
            for (group, hash) in job.charges.as_slice() {
                let spec = job.specs.group(*group);
                push(&mut numbers, set_at[generation][group.index()]);
                for (q, numbers_of_quota) in spec.args[1..].chunks_exact(3).enumerate() {
                    let id = (
                        group.index(),
                        numbers_of_quota[0],
                        numbers_of_quota[1],
                        *hash,
                    );
                    let at = *index.entry(id).or_insert_with(|| {
                        spec.key(&mut keys, q, *hash);
                        key_ends.push(keys.len());
                        key_ends.len() as u64
                    });
                    push(&mut numbers, at);
                }
            }
        }
        CallArgs {
            numbers,
            keys,
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
    fn declared(&self, sha: &str) -> redis::Cmd {
        use redis::RedisWrite;
        let mut command = redis::cmd("EVALSHA");
        command.arg(sha).arg(self.key_ends.len());
        for key in self.keys() {
            command.write_arg(key);
        }
        command.arg(&self.numbers[..]);
        command
    }

    /// `EVALSHA` with the keys passed as arguments, for the script that may touch several
    /// slots of one cluster node.
    pub(super) fn undeclared(&self, sha: &str) -> redis::Cmd {
        use redis::RedisWrite;
        let mut numbers = self.numbers.clone();
        numbers[KEYS_IN_ARGV_AT..KEYS_IN_ARGV_AT + 8]
            .copy_from_slice(&(self.key_ends.len() as f64).to_le_bytes());
        let mut command = redis::cmd("EVALSHA");
        command.arg(sha).arg(0).arg(numbers);
        for key in self.keys() {
            command.write_arg(key);
        }
        command
    }
}

/// Gathers whatever requests are waiting into one script call, so a busy gateway makes
/// one round trip for many requests; each request is still decided atomically, in order.
pub(super) async fn run_batches(
    mut queue: mpsc::Receiver<Job>,
    connection: ConnectionManager,
    script: Arc<redis::Script>,
    timeout: Duration,
) {
    let mut connection = connection;
    let mut last_call = std::time::Instant::now();
    while let Some(first) = queue.recv().await {
        let mut batch = gather(first, &mut queue);
        if last_call.elapsed() >= IDLE_CHECK {
            // Redis may have closed a connection left idle (its `timeout`, `CLIENT KILL`):
            // a PING finds out, and the manager makes a new one, before a script is sent
            // that a closed connection would fail. A script call itself is never made
            // twice: a connection that closes after it was written may have run it.
            let ping = redis::cmd("PING");
            let _ = tokio::time::timeout(timeout, ping.query_async::<()>(&mut connection)).await;
            batch.retain(|job| !job.reply.is_closed());
        }
        if batch.is_empty() {
            continue;
        }
        // One call at a time: Redis runs scripts one after another anyway, and whatever
        // arrives meanwhile rides in the next batch.
        call(batch, &mut connection, &script, timeout).await;
        last_call = std::time::Instant::now();
    }
}

/// How long a connection may sit unused before it is checked with a PING ahead of the
/// next call.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// The first job and whatever else is waiting, up to [`MAX_BATCH`].
pub(super) fn gather(first: Job, queue: &mut mpsc::Receiver<Job>) -> Vec<Job> {
    gather_from(first, || queue.try_recv().ok())
}

/// The first job and what `next` has waiting, up to [`MAX_BATCH`], less the jobs whose
/// requests stopped waiting (they timed out and were answered as `on_error` says):
/// charging them afterwards would count requests their limits never decided.
pub(super) fn gather_from(first: Job, mut next: impl FnMut() -> Option<Job>) -> Vec<Job> {
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

/// One script call deciding `batch`, and each job's six numbers (or the error) sent back.
pub(super) async fn call(
    batch: Vec<Job>,
    connection: &mut impl redis::aio::ConnectionLike,
    script: &redis::Script,
    timeout: Duration,
) {
    let args = CallArgs::new(&batch);
    let command = args.declared(script.get_hash());
    let call = async {
        match command.query_async::<redis::Value>(connection).await {
            // A server that lost its scripts (restarted, or `SCRIPT FLUSH`): load it again.
            Err(error)
                if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                script.load_async(connection).await?;
                command.query_async::<redis::Value>(connection).await
            }
            reply => reply,
        }
    };
    let outcome = match tokio::time::timeout(timeout, call).await {
        Ok(Ok(reply)) => numbers(reply),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    };
    answer(batch, outcome);
}

/// The script run for no request, as the probe runs it: a server that answers `PING` but
/// refuses the script (an ACL without `EVALSHA`, `SCRIPT LOAD` or the commands the script
/// calls) fails every request, so it does not count as serving.
pub(super) async fn run_for_nothing(
    connection: &mut impl redis::aio::ConnectionLike,
    script: &redis::Script,
) -> Result<(), String> {
    let command = CallArgs::new(&[]).declared(script.get_hash());
    let reply = match command.query_async::<redis::Value>(connection).await {
        Err(error)
            if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            script
                .load_async(connection)
                .await
                .map_err(|e| format!("SCRIPT LOAD: {e}"))?;
            command.query_async::<redis::Value>(connection).await
        }
        reply => reply,
    };
    match reply.map_err(|e| format!("the rate-limit script: {e}"))? {
        redis::Value::BulkString(bytes) if bytes.is_empty() => Ok(()),
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

/// Sends each job of a batch its six numbers from the script's reply, or the error.
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
        // The request may have given up already; that is fine.
        let _ = job.reply.send(reply);
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
        LimitSettings {
            groups,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            exempt: Vec::new(),
            response_headers: false,
        }
    }

    fn job(specs: &Arc<RedisSpecs>, ip: u64, email: u64) -> Job {
        Job {
            specs: specs.clone(),
            charges: Charges::new(&[(LimitGroup::PerIp, ip), (LimitGroup::PerEmail, email)]),
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn a_request_that_stopped_waiting_is_not_sent() {
        let specs = Arc::new(RedisSpecs::new(&limits(&[(3, 3600)]), "rg", false));
        let (sender, mut queue) = mpsc::channel(8);
        let mut waiting = Vec::new();
        for i in 0..4u64 {
            let (reply, answer) = oneshot::channel();
            let job = Job {
                specs: specs.clone(),
                charges: Charges::new(&[(LimitGroup::PerIp, i)]),
                reply,
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

    #[test]
    fn each_distinct_key_is_passed_once_and_every_request_points_at_its_sets_and_keys() {
        // A reload between two requests of one batch: the per-IP quota is unchanged (its
        // keys are shared), the per-email one changed (new keys).
        let old = Arc::new(RedisSpecs::new(&limits(&[(3, 3600)]), "rg", false));
        let new = Arc::new(RedisSpecs::new(
            &limits(&[(3, 3600), (5, 86_400)]),
            "rg",
            false,
        ));
        let batch = [job(&old, 1, 7), job(&new, 1, 7), job(&new, 2, 7)];
        let args = CallArgs::new(&batch);
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
        assert_eq!(&nums[..2], [3, 0], "three requests, keys declared");
        let mut next = at(3);
        let mut keys_of_requests = Vec::new();
        for _ in 0..3 {
            let groups = at(next);
            next += 1;
            let mut keys = Vec::new();
            for _ in 0..groups {
                let set = at(next);
                let quotas = at(set);
                for q in 0..quotas {
                    // The set holds interval_us, capacity_us and shadow per quota.
                    let interval_us = at(set + 1 + 3 * q);
                    let key = &all_keys[usize::try_from(at(next + 1 + q)).unwrap() - 1];
                    assert!(key.contains(&format!(":{interval_us}.")), "{key}");
                    keys.push(key.clone());
                }
                next += 1 + quotas;
            }
            keys_of_requests.push(keys);
        }
        assert_eq!(next as usize, nums.len() + 1, "every number read");
        let [first, second, third] = &keys_of_requests[..] else {
            panic!("{keys_of_requests:?}")
        };
        assert_eq!(first.len(), 2);
        assert_eq!(second.len(), 3);
        // The unchanged per-IP quota's key, and the first per-email quota's (its numbers
        // did not change), are the same keys in both generations.
        assert_eq!(first[..2], second[..2]);
        assert_ne!(second[0], third[0], "another address");
        assert_eq!(second[1..], third[1..], "the same mailbox");
        // Each key once: per-IP for two addresses, two per-email keys.
        assert_eq!(all_keys.len(), 4, "{all_keys:?}");
        let mut distinct = all_keys.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 4);
    }

    #[test]
    fn a_slot_is_the_crc16_of_the_hash_tag_as_redis_computes_it() {
        let limits = LimitSettings {
            groups: Default::default(),
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            exempt: Vec::new(),
            response_headers: false,
        };
        let specs = RedisSpecs::new(&limits, "rg", true);
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
