//! A changed quota's state carried over a reload, in Redis: as the memory store does
//! (`QuotaState::carried_from`), each address is charged under the new quota with the
//! requests it had spent under the one it replaces, at most a full burst, so that
//! tightening a limit (3 an hour to 1) refuses at once an address that had 2.
//!
//! A key holds every quota of its group for one address (client, IP), each by its numbers,
//! so each key of a group with a changed quota is given the new quota's state from the
//! old one's: each master is walked with `SCAN` (in the background, after the reload), and
//! each key whose old quota still counts gains the new one, unless the key holds the new
//! one further along already (a request, another replica's walk, or a quota the group had
//! before). The old quota's state stays while it counts, for replicas still on the old
//! file. Replicas reloading the same file do the same work and agree. Until the walk
//! reaches a key, a request for it finds no state of the new quota and starts afresh; the
//! walk took 1.5 s for 100,000 keys (a 2-core machine, one standalone server, the gateway
//! built for tests). Walks run one at a time, so a second reload's walk reads what the
//! first one wrote; a master that fails its walk is walked again, a few times, with the
//! others done meanwhile.

use std::time::Duration;

use super::global_keys::group_micros;
use super::*;

/// One key's changed quotas carried over, in order: per move in ARGV[1] (packed as the
/// decision script's numbers) the old quota's interval_us and capacity_us, then the new
/// one's. The old quota's backlog (its TAT past now) in requests, at the new quota's
/// interval, at most the new quota's capacity, unless the key holds the new quota further
/// along. The key is written back (as the decision script writes it: a triple of doubles
/// per quota, expiring with its last TAT) only if a quota was carried.
const CARRY: &str = r"
pcall(redis.replicate_commands)
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local read, value = pcall(redis.call, 'GET', KEYS[1])
if not read or not value then
  return 0
end
local n = #value / 8
if n > 999 then
  n = 999
end
n = n - n % 3
if n == 0 then
  return 0
end
local stored = {struct.unpack('<' .. string.rep('d', n), value)}
local moves = {struct.unpack('<' .. string.rep('d', #ARGV[1] / 8), ARGV[1])}
local carried = 0
for m = 1, #ARGV[1] / 8, 4 do
  local from_interval, from_capacity = moves[m], moves[m + 1]
  local to_interval, to_capacity = moves[m + 2], moves[m + 3]
  local from, to = nil, nil
  for t = 1, n, 3 do
    if stored[t] == from_interval and stored[t + 1] == from_capacity then
      from = t
    elseif stored[t] == to_interval and stored[t + 1] == to_capacity then
      to = t
    end
  end
  -- Only a state that reads as one (no further ahead than its capacity) is carried.
  if from and stored[from + 2] > now and stored[from + 2] <= now + from_capacity then
    local lead = (stored[from + 2] - now) * to_interval / from_interval
    lead = math.min(lead - lead % 1, to_capacity)
    if not to then
      to = n + 1
      n = n + 3
      stored[to], stored[to + 1], stored[to + 2] = to_interval, to_capacity, 0
    end
    if stored[to + 2] < now + lead then
      stored[to + 2] = now + lead
      carried = 1
    end
  end
end
if carried == 0 then
  return 0
end
local row, k, latest = {}, 0, now
for t = 1, n, 3 do
  local tat = stored[t + 2]
  if tat > now and tat <= now + stored[t + 1] and stored[t + 1] < 9007199254740992 then
    row[k + 1], row[k + 2], row[k + 3] = stored[t], stored[t + 1], stored[t + 2]
    k = k + 3
    if stored[t + 2] > latest then
      latest = stored[t + 2]
    end
  end
end
local ttl = (latest - now) / 1000
redis.call('PSETEX', KEYS[1], string.format('%d', ttl - ttl % 1 + 1),
  struct.pack('<' .. string.rep('d', k), unpack(row, 1, k)))
return 1
";

/// Keys asked for per `SCAN` step.
const SCAN_COUNT: usize = 1000;
/// How long each step of a walk (a `SCAN`, a pipeline of carries) may take.
const STEP_WAIT: Duration = Duration::from_secs(5);

/// One changed quota of a group: the quota it replaces and its own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuotaMove {
    pub(crate) group: LimitGroup,
    pub(crate) from: Quota,
    pub(crate) to: Quota,
}

/// `SCAN`'s pattern for a group's keys: `{prefix}:{group}:` and the keyed hash's 16 hex
/// digits, in Cluster mode inside braces (the whole key is its hash tag). No other key
/// matches: not the probe's, another group's, a longer prefix's, or one of the layout
/// before (one key per quota, `{prefix}:{group}:{quota}:{hash}`).
fn group_pattern(prefix: &str, group: LimitGroup, cluster: bool) -> String {
    let hash = "?".repeat(16);
    if cluster {
        format!("{{{prefix}:{}:{hash}}}", group.name())
    } else {
        format!("{prefix}:{}:{hash}", group.name())
    }
}

/// The moves of each group that has any, as the script's packed argument; the global
/// group's quotas as each of its keys holds them, spread over `global_keys` (before the
/// reload, after it).
fn by_group(moves: &[QuotaMove], global_keys: (u64, u64)) -> Vec<(LimitGroup, Vec<u8>)> {
    let mut groups: Vec<(LimitGroup, Vec<u8>)> = Vec::new();
    for movement in moves {
        let at = match groups.iter().position(|(g, _)| *g == movement.group) {
            Some(at) => at,
            None => {
                groups.push((movement.group, Vec::new()));
                groups.len() - 1
            }
        };
        let ((from_interval, from_capacity), (to_interval, to_capacity)) = (
            group_micros(movement.group, &movement.from, global_keys.0),
            group_micros(movement.group, &movement.to, global_keys.1),
        );
        for n in [from_interval, from_capacity, to_interval, to_capacity] {
            groups[at].1.extend_from_slice(&(n as f64).to_le_bytes());
        }
    }
    groups
}

impl RedisStore {
    /// Carries the state of each changed quota in `moves` over to its new keys, in the
    /// background (an embedding app that reloads outside a Tokio runtime carries nothing).
    /// `global_keys`: how many keys the global group was spread over before the reload,
    /// and after it. Once every master is walked, the cached denials that stood only until
    /// then (`stale`) are forgotten.
    pub(crate) fn carry_over(
        self: &Arc<Self>,
        moves: Vec<QuotaMove>,
        global_keys: (u64, u64),
        stale: StaleDenials,
    ) {
        if moves.is_empty() {
            self.walk_over(&stale);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.walk_over(&stale);
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            // One walk at a time: a later reload's walk reads what this one writes.
            let _walking = store.carrying.lock().await;
            let started = tokio::time::Instant::now();
            let mut carried = 0;
            // The masters (by name) walked through: each attempt walks every other master
            // the map names, so a replica promoted after a failed attempt is walked too.
            let mut walked: Vec<String> = Vec::new();
            for attempt in 0..CARRY_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                }
                match store.carry(&moves, global_keys, &mut walked).await {
                    Ok((count, errors)) => {
                        carried += count;
                        if errors.is_empty() {
                            tracing::info!(
                                target: "reset_guard::limit",
                                carried,
                                took_ms = started.elapsed().as_millis() as u64,
                                "changed quotas' state carried over in Redis"
                            );
                            store.forget_stale_denials(&stale);
                            return;
                        }
                        tracing::warn!(target: "reset_guard::limit", error = %errors.join("; "), attempt = attempt + 1, "carrying changed quotas' state over in Redis failed in part; trying again");
                    }
                    Err(error) => {
                        tracing::warn!(target: "reset_guard::limit", %error, attempt = attempt + 1, "carrying changed quotas' state over in Redis failed; trying again");
                    }
                }
            }
            tracing::error!(
                target: "reset_guard::limit",
                carried,
                "changed quotas' state not carried over in Redis where it failed: those keys start afresh"
            );
            store.walk_over(&stale);
        });
    }

    /// One attempt: every master the cluster's map names now but `walked` does not (the
    /// masters walked through by attempts before; those walked through now are added). How
    /// many keys were carried, and why the failed masters failed. A master that failed over
    /// meanwhile is no longer named, and its promoted replica, new to `walked`, is walked.
    /// Without the cluster's map of masters, nothing is walked.
    async fn carry(
        &self,
        moves: &[QuotaMove],
        global_keys: (u64, u64),
        walked: &mut Vec<String>,
    ) -> Result<(u64, Vec<String>), String> {
        let script = redis::Script::new(CARRY);
        let groups = by_group(moves, global_keys);
        let mut carried = 0;
        let mut errors = Vec::new();
        match &self.cluster {
            Some(cluster) => {
                let masters = cluster.master_connections(self.timeout).await?;
                'masters: for (name, master) in masters {
                    if walked.contains(&name) {
                        continue;
                    }
                    let mut connection = match master {
                        Ok(connection) => connection,
                        Err(error) => {
                            errors.push(format!("{name}: {error}"));
                            continue;
                        }
                    };
                    for (group, moves) in &groups {
                        let pattern = group_pattern(&self.prefix, *group, true);
                        match carry_on(&mut connection, &script, &pattern, moves).await {
                            Ok(count) => carried += count,
                            Err(error) => {
                                errors.push(format!("{name}: {error}"));
                                continue 'masters;
                            }
                        }
                    }
                    walked.push(name);
                }
            }
            None => {
                let _ = self.resolve().await;
                let master = self.master.load_full().ok_or("no Redis master is known")?;
                let mut connection = master.connection.clone();
                for (group, moves) in &groups {
                    let pattern = group_pattern(&self.prefix, *group, false);
                    carried += carry_on(&mut connection, &script, &pattern, moves).await?;
                }
            }
        }
        Ok((carried, errors))
    }
}

/// Tries at walking a master: the first, then four more 2, 4, 8 and 16 s apart.
const CARRY_ATTEMPTS: u32 = 5;

/// Walks one server's keys of a group (`pattern`), carrying its changed quotas (`moves`,
/// packed) in each; how many keys gained state.
async fn carry_on(
    connection: &mut (impl redis::aio::ConnectionLike + Send),
    script: &redis::Script,
    pattern: &str,
    moves: &[u8],
) -> Result<u64, String> {
    let wait = STEP_WAIT;
    // A pipeline sends the script by its hash only: loaded first.
    tokio::time::timeout(wait, script.load_async(connection))
        .await
        .map_err(|_| format!("SCRIPT LOAD: no answer within {wait:?}"))?
        .map_err(|e| format!("SCRIPT LOAD: {e}"))?;
    // A user whose ACL leaves DBSIZE out gets the bound of a billion keys.
    let dbsize = redis::cmd("DBSIZE");
    let dbsize = dbsize.query_async::<u64>(connection);
    let keys_held = tokio::time::timeout(wait, dbsize)
        .await
        .map_err(|_| format!("DBSIZE: no answer within {wait:?}"))?
        .unwrap_or(1_000_000_000);
    walk(
        connection,
        script,
        pattern,
        moves,
        (keys_held, scan_bound(keys_held)),
    )
    .await
}

/// The most `SCAN` steps a walk over `keys_held` keys takes before it is given up. Redis
/// ends every SCAN: in about as many steps as its keys fill steps of SCAN_COUNT (its
/// table at most twice its keys, and keys arriving meanwhile), or, in a table left sparse
/// (Redis does not shrink it while a fork saves the data), in about a step per 10,000 of
/// its buckets: 100,000 steps more cover a table of a billion. A server that goes on past
/// that is not Redis, and would hold up every later carry-over.
fn scan_bound(keys_held: u64) -> u64 {
    keys_held / SCAN_COUNT as u64 * 4 + 100_000
}

/// [`carry_on`]'s walk, giving up after `most_steps` `SCAN` steps (`keys_held`, for the
/// error).
async fn walk(
    connection: &mut (impl redis::aio::ConnectionLike + Send),
    script: &redis::Script,
    pattern: &str,
    moves: &[u8],
    (keys_held, most_steps): (u64, u64),
) -> Result<u64, String> {
    let wait = STEP_WAIT;
    let mut cursor: u64 = 0;
    let mut carried = 0;
    for _ in 0..most_steps {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let step = scan.query_async::<(u64, Vec<String>)>(connection);
        let (next, keys) = tokio::time::timeout(wait, step)
            .await
            .map_err(|_| format!("SCAN: no answer within {wait:?}"))?
            .map_err(|e| format!("SCAN: {e}"))?;
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            // One key's failure is its own: a key in a slot being moved (`MOVED`, `ASK`,
            // `TRYAGAIN`) is skipped, its new quota left to start afresh; the walk goes on.
            pipe.ignore_errors();
            for key in &keys {
                pipe.invoke_script(script.key(key).arg(moves));
            }
            let answers = pipe.query_async::<Vec<redis::RedisResult<u64>>>(connection);
            let done = tokio::time::timeout(wait, answers)
                .await
                .map_err(|_| format!("carrying: no answer within {wait:?}"))?
                .map_err(|e| format!("carrying: {e}"))?;
            for answer in done {
                match answer {
                    Ok(count) => carried += count,
                    Err(error) if moving(&error) => {}
                    Err(error) => return Err(format!("carrying: {error}")),
                }
            }
        }
        if next == 0 {
            return Ok(carried);
        }
        cursor = next;
    }
    Err(format!(
        "SCAN: no end after {most_steps} steps over {keys_held} keys (is this a Redis server?)"
    ))
}

/// Whether a key's slot is being moved between masters (`MOVED`, `ASK`, `TRYAGAIN`).
fn moving(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    super::batch::redirected(error)
        || matches!(error.kind(), ErrorKind::Server(ServerErrorKind::TryAgain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_finds_the_keys_the_decision_writes_and_no_other() {
        let limits = LimitSettings::of_groups(Default::default());
        for cluster in [false, true] {
            let pattern = group_pattern("rg", LimitGroup::PerEmail, cluster);
            let specs = super::super::batch::RedisSpecs::new(&limits, "rg", cluster, 1);
            let key = specs.key_of(LimitGroup::PerEmail, 0x00ab_cdef_0123_4567);
            assert!(glob(&pattern, &key), "{pattern} {key}");
            for other in [
                "rg:probe",
                "rg:per_ip:00abcdef01234567",
                "rg:per_email:1200000000.3600000000:00abcdef01234567",
                "rg:per_email:00abcdef01234567:x",
                "{rg:per_email:00abcdef01234567}:1200000000.3600000000",
            ] {
                assert!(!glob(&pattern, other), "{pattern} matches {other}");
            }
        }
    }

    /// Redis's glob for the patterns above: `?` is any one character, the rest literal.
    fn glob(pattern: &str, key: &str) -> bool {
        pattern.len() == key.len()
            && pattern
                .bytes()
                .zip(key.bytes())
                .all(|(p, k)| p == b'?' || p == k)
    }

    /// A server that answers every `SCAN` with more to come (no Redis does): the walk
    /// gives up, with the reason, after the steps its key count allows, rather than holding
    /// the carry-over (and every later one) forever.
    #[tokio::test]
    async fn a_scan_that_never_ends_is_given_up() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let scans = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = scans.clone();
        let script = redis::Script::new(CARRY);
        let loaded = format!("$40\r\n{}\r\n", script.get_hash());
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buffer = vec![0; 1 << 16];
            let mut pending = Vec::new();
            while let Ok(n) = stream.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                pending.extend_from_slice(&buffer[..n]);
                // One reply per whole command (a RESP array of bulk strings) received.
                let mut replies = Vec::new();
                while let Some((name, used)) = command_name(&pending) {
                    pending.drain(..used);
                    replies.push(match name.to_ascii_uppercase().as_str() {
                        "SCRIPT" => loaded.clone(),
                        "DBSIZE" => ":10\r\n".to_owned(),
                        "SCAN" => {
                            counted.fetch_add(1, Ordering::Relaxed);
                            "*2\r\n$1\r\n7\r\n*0\r\n".to_owned()
                        }
                        _ => "+OK\r\n".to_owned(),
                    });
                }
                if stream.write_all(replies.concat().as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let walked = walk(&mut connection, &script, "rg:per_email:*", &[], (10, 1000)).await;
        let error = walked.unwrap_err();
        assert!(
            error.contains("no end after 1000 steps over 10 keys"),
            "{error}"
        );
        assert_eq!(scans.load(Ordering::Relaxed), 1000);
        // The bound leaves room for a table sparse as a fork leaves it: 16,777,216 buckets
        // (once 8.4 million keys) holding 100,000 keys took 1,678 steps.
        assert_eq!(scan_bound(10), 100_000);
        assert!(scan_bound(100_000) > 1_678 * 10);
    }

    /// The first command in `bytes` (a RESP array of bulk strings): its name, and how many
    /// bytes it took; none until it has all arrived.
    fn command_name(bytes: &[u8]) -> Option<(String, usize)> {
        let line = |at: usize| -> Option<(&str, usize)> {
            let end = at + bytes.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
            Some((std::str::from_utf8(&bytes[at..end]).ok()?, end + 2))
        };
        let (count, mut at) = line(0)?;
        let count: usize = count.strip_prefix('*')?.parse().ok()?;
        let mut name = None;
        for _ in 0..count {
            let (length, start) = line(at)?;
            let length: usize = length.strip_prefix('$')?.parse().ok()?;
            let word = bytes.get(start..start + length)?;
            name.get_or_insert_with(|| String::from_utf8_lossy(word).into_owned());
            at = start + length + 2;
            if bytes.len() < at {
                return None;
            }
        }
        Some((name?, at))
    }

    #[test]
    fn each_group_is_walked_once_with_all_its_moves_and_the_global_keys_hold_their_share() {
        let quota =
            |requests, secs| Quota::new(requests, Duration::from_secs(secs), None, false).unwrap();
        let movement = |group, from, to| QuotaMove { group, from, to };
        let groups = by_group(
            &[
                movement(LimitGroup::PerEmail, quota(3, 3600), quota(1, 3600)),
                movement(LimitGroup::PerIp, quota(10, 60), quota(5, 60)),
                movement(LimitGroup::PerEmail, quota(3, 3600), quota(10, 86_400)),
                movement(LimitGroup::Global, quota(100, 1), quota(50, 1)),
            ],
            (4, 4),
        );
        let numbers = |packed: &[u8]| -> Vec<u64> {
            packed
                .chunks_exact(8)
                .map(|n| f64::from_le_bytes(n.try_into().unwrap()) as u64)
                .collect()
        };
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].0, LimitGroup::PerEmail);
        assert_eq!(
            numbers(&groups[0].1),
            [
                1_200_000_000,
                3_600_000_000,
                3_600_000_000,
                3_600_000_000,
                1_200_000_000,
                3_600_000_000,
                8_640_000_000,
                86_400_000_000
            ]
        );
        assert_eq!(
            numbers(&groups[1].1),
            [6_000_000, 60_000_000, 12_000_000, 60_000_000]
        );
        // Spread over four keys, each holds a quarter of the rate, and of the burst.
        assert_eq!(groups[2].0, LimitGroup::Global);
        assert_eq!(
            numbers(&groups[2].1),
            [40_000, 1_000_000, 80_000, 1_000_000]
        );
    }
}
