//! A changed quota's state carried over a reload, in Redis: as the memory store does
//! (`QuotaState::carried_from`), each address is charged under the new quota with the
//! requests it had spent under the one it replaces, at most a full burst, so that
//! tightening a limit (3 an hour to 1) refuses at once an address that had 2.
//!
//! A quota's keys are named by its numbers, so the new quota's keys are written from the
//! old ones: each master is walked with `SCAN` (in the background, after the reload), and
//! each old key that still counts gives its new key, unless that key is already further
//! along (a request, another replica's walk, or a quota the group had before). Replicas
//! reloading the same file do the same work and agree. Until the walk reaches a key, a
//! request for it finds the new quota's key absent and starts afresh; the walk took 1.2 s
//! for 100,000 keys of a quota (a busy 2-core machine, one standalone server). Walks run
//! one at a time, so a second reload's walk reads what the first one wrote; a master that
//! fails its walk is walked again, a few times, with the others done meanwhile.

use std::time::Duration;

use super::*;

/// One key's state carried from the quota it replaced: the old key's backlog (its TAT past
/// now) in requests, at the new quota's interval, at most the new quota's capacity, unless
/// the new key is already further along. The same TTL and number forms as the decision
/// script.
const CARRY: &str = r"
pcall(redis.replicate_commands)
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat <= now then
  return 0
end
local lead = math.min((tat - now) * tonumber(ARGV[2]) / tonumber(ARGV[1]), tonumber(ARGV[3]))
local present = tonumber(redis.call('GET', KEYS[2]))
if present and present >= now + lead then
  return 0
end
local ttl = lead / 1000
redis.call('PSETEX', KEYS[2], string.format('%d', ttl - ttl % 1 + 1), string.format('%d', now + lead))
return 1
";

/// Keys asked for per `SCAN` step.
const SCAN_COUNT: usize = 1000;

/// One changed quota of a group: the quota it replaces and its own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuotaMove {
    pub(crate) group: LimitGroup,
    pub(crate) from: Quota,
    pub(crate) to: Quota,
}

/// `interval.capacity` in microseconds, as a quota's keys name it.
fn quota_part(quota: &Quota) -> String {
    let interval_us = (quota.interval_ns / 1000).max(1);
    format!("{interval_us}.{}", interval_us * u64::from(quota.burst))
}

/// How one move's keys are found and renamed.
struct Names {
    /// `SCAN`'s pattern for the old quota's keys.
    pattern: String,
    /// What an old key's name has that the new one replaces: at its start (standalone:
    /// `{prefix}:{group}:{quota}:`) or at its end (cluster: `}:{quota}`).
    old: String,
    new: String,
    at_end: bool,
}

impl Names {
    fn of(prefix: &str, movement: &QuotaMove, cluster: bool) -> Names {
        let group = movement.group.name();
        let (from, to) = (quota_part(&movement.from), quota_part(&movement.to));
        if cluster {
            Names {
                pattern: format!("{{{prefix}:{group}:*}}:{from}"),
                old: format!("}}:{from}"),
                new: format!("}}:{to}"),
                at_end: true,
            }
        } else {
            Names {
                pattern: format!("{prefix}:{group}:{from}:*"),
                old: format!("{prefix}:{group}:{from}:"),
                new: format!("{prefix}:{group}:{to}:"),
                at_end: false,
            }
        }
    }

    /// The new quota's key for an old key (none for a name not of the old quota).
    fn renamed(&self, key: &str) -> Option<String> {
        if self.at_end {
            let stem = key.strip_suffix(&self.old)?;
            Some(format!("{stem}{}", self.new))
        } else {
            let rest = key.strip_prefix(&self.old)?;
            Some(format!("{}{rest}", self.new))
        }
    }
}

impl RedisStore {
    /// Carries the state of each changed quota in `moves` over to its new keys, in the
    /// background (an embedding app that reloads outside a Tokio runtime carries nothing).
    pub(crate) fn carry_over(self: &Arc<Self>, moves: Vec<QuotaMove>) {
        if moves.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            // One walk at a time: a later reload's walk reads what this one writes.
            let _walking = store.carrying.lock().await;
            let started = tokio::time::Instant::now();
            let mut carried = 0;
            // The masters (by name) still to walk; none known yet: every one.
            let mut pending: Option<Vec<String>> = None;
            for attempt in 0..CARRY_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                }
                match store.carry(&moves, &mut pending).await {
                    Ok((count, errors)) => {
                        carried += count;
                        if errors.is_empty() {
                            tracing::info!(
                                target: "reset_guard::limit",
                                carried,
                                took_ms = started.elapsed().as_millis() as u64,
                                "changed quotas' state carried over in Redis"
                            );
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
        });
    }

    /// One attempt: every master, or those `pending` names (the ones that failed before;
    /// left naming those that failed again). How many keys were carried, and why the failed
    /// masters failed. Without the cluster's map of masters, nothing is walked and `pending`
    /// stays as it was.
    async fn carry(
        &self,
        moves: &[QuotaMove],
        pending: &mut Option<Vec<String>>,
    ) -> Result<(u64, Vec<String>), String> {
        let script = redis::Script::new(CARRY);
        let mut carried = 0;
        let mut errors = Vec::new();
        match &self.cluster {
            Some(cluster) => {
                let masters = cluster.master_connections(self.timeout).await?;
                let mut failed = Vec::new();
                for (name, master) in masters {
                    if pending.as_ref().is_some_and(|names| !names.contains(&name)) {
                        continue;
                    }
                    let mut connection = match master {
                        Ok(connection) => connection,
                        Err(error) => {
                            errors.push(format!("{name}: {error}"));
                            failed.push(name);
                            continue;
                        }
                    };
                    for movement in moves {
                        let names = Names::of(&self.prefix, movement, true);
                        match carry_on(&mut connection, &script, &names, movement).await {
                            Ok(count) => carried += count,
                            Err(error) => {
                                errors.push(format!("{name}: {error}"));
                                failed.push(name);
                                break;
                            }
                        }
                    }
                }
                *pending = Some(failed);
            }
            None => {
                let _ = self.resolve().await;
                let master = self.master.load_full().ok_or("no Redis master is known")?;
                let mut connection = master.connection.clone();
                for movement in moves {
                    let names = Names::of(&self.prefix, movement, false);
                    carried += carry_on(&mut connection, &script, &names, movement).await?;
                }
            }
        }
        Ok((carried, errors))
    }
}

/// Tries at walking a master: the first, then four more 2, 4, 8 and 16 s apart.
const CARRY_ATTEMPTS: u32 = 5;

/// Walks one server's keys of the old quota, carrying each; how many were carried.
async fn carry_on(
    connection: &mut (impl redis::aio::ConnectionLike + Send),
    script: &redis::Script,
    names: &Names,
    movement: &QuotaMove,
) -> Result<u64, String> {
    let (from, to) = (&movement.from, &movement.to);
    let args = [
        (from.interval_ns / 1000).max(1),
        (to.interval_ns / 1000).max(1),
        (to.interval_ns / 1000).max(1) * u64::from(to.burst),
    ];
    let wait = Duration::from_secs(5);
    // A pipeline sends the script by its hash only: loaded first.
    tokio::time::timeout(wait, script.load_async(connection))
        .await
        .map_err(|_| format!("SCRIPT LOAD: no answer within {wait:?}"))?
        .map_err(|e| format!("SCRIPT LOAD: {e}"))?;
    let mut cursor: u64 = 0;
    let mut carried = 0;
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&names.pattern)
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
            // `TRYAGAIN`) is skipped, its new key left to start afresh; the walk goes on.
            pipe.ignore_errors();
            for key in &keys {
                if let Some(new) = names.renamed(key) {
                    pipe.invoke_script(script.key(key).key(new).arg(&args[..]));
                }
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

    fn movement() -> QuotaMove {
        let quota = |requests, secs| Quota::new(requests, Duration::from_secs(secs), None, false);
        QuotaMove {
            group: LimitGroup::PerEmail,
            from: quota(3, 3600).unwrap(),
            to: quota(1, 3600).unwrap(),
        }
    }

    #[test]
    fn keys_are_renamed_as_the_decision_names_them() {
        let plain = Names::of("rg", &movement(), false);
        assert_eq!(plain.pattern, "rg:per_email:1200000000.3600000000:*");
        assert_eq!(
            plain
                .renamed("rg:per_email:1200000000.3600000000:00ab")
                .as_deref(),
            Some("rg:per_email:3600000000.3600000000:00ab")
        );
        let cluster = Names::of("rg", &movement(), true);
        assert_eq!(cluster.pattern, "{rg:per_email:*}:1200000000.3600000000");
        assert_eq!(
            cluster
                .renamed("{rg:per_email:00ab}:1200000000.3600000000")
                .as_deref(),
            Some("{rg:per_email:00ab}:3600000000.3600000000")
        );
        assert_eq!(plain.renamed("rg:per_ip:1.2:00ab"), None);
    }
}
