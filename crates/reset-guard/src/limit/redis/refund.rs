//! Cluster mode, `cluster_groups: at_once`: giving back what a group charged a request that
//! an earlier group denied. Decided in order, that group would not have been asked; asked
//! at once with the others, it admitted and charged its quotas one request each, which go
//! back here: each quota's TAT moves back by its interval. GCRA makes that exact for the
//! state left behind (what another request charged meanwhile stays charged; a TAT moved
//! back past now reads as a fresh state, as it would have without the charge).

use super::batch::micros;
use super::*;

/// One key's quotas refunded one request each: per quota in ARGV[1] (packed doubles, as
/// the decision script's numbers) its interval_us and capacity_us. Only a quota the key
/// holds moves back; the key is written back as the decision script writes it (a triple
/// of doubles per quota that still counts, expiring with its last TAT), or left to expire
/// within a millisecond when none counts any more (the ACL the README gives has no DEL).
pub(super) const REFUND: &str = r"
pcall(redis.replicate_commands)
local value = redis.call('GET', KEYS[1])
if not value then
  return 0
end
local n = #value / 8
n = n - n % 3
if n == 0 then
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local stored = {struct.unpack('<' .. string.rep('d', n), value)}
local asks = {struct.unpack('<' .. string.rep('d', #ARGV[1] / 8), ARGV[1])}
local refunded = 0
for a = 1, #ARGV[1] / 8, 2 do
  for t = 1, n, 3 do
    if stored[t] == asks[a] and stored[t + 1] == asks[a + 1] then
      stored[t + 2] = stored[t + 2] - asks[a]
      refunded = refunded + 1
      break
    end
  end
end
if refunded == 0 then
  return 0
end
local row, k, latest = {}, 0, now
for t = 1, n, 3 do
  local tat = stored[t + 2]
  if tat > now and tat <= now + stored[t + 1] and stored[t + 1] < 9007199254740992 then
    row[k + 1], row[k + 2], row[k + 3] = stored[t], stored[t + 1], tat
    k = k + 3
    if tat > latest then
      latest = tat
    end
  end
end
local ttl = (latest - now) / 1000
redis.call('PSETEX', KEYS[1], string.format('%d', ttl - ttl % 1 + 1),
  struct.pack('<' .. string.rep('d', k), unpack(row, 1, k)))
return refunded
";

impl RedisStore {
    /// Gives back one request on each quota `group` charged for `hash`: every enforced
    /// quota (the group admitted), and its shadow quotas too when none of them was over
    /// its limit (`shadows_charged`; one that was is not charged, and which one is not
    /// known, so then none is refunded: a shadow quota only counts). Two quotas with the
    /// same numbers share one state, charged once, and are refunded once. A refund that
    /// fails leaves that one request charged until the key expires; it is logged.
    pub(super) async fn refund(
        &self,
        specs: &RedisSpecs,
        (group, hash): (LimitGroup, u64),
        shadows_charged: bool,
    ) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let mut quotas: Vec<(u64, u64)> = Vec::new();
        for quota in &specs.group(group).quotas {
            let numbers = micros(quota);
            if (!quota.shadow || shadows_charged) && !quotas.contains(&numbers) {
                quotas.push(numbers);
            }
        }
        if quotas.is_empty() {
            return;
        }
        let packed: Vec<u8> = quotas
            .iter()
            .flat_map(|&(interval, capacity)| [interval as f64, capacity as f64])
            .flat_map(f64::to_le_bytes)
            .collect();
        let mut connection = cluster
            .probe
            .get_or_init(|| async { cluster.connection() })
            .await
            .clone();
        let mut call = cluster.refund.prepare_invoke();
        call.key(specs.key_of(group, hash)).arg(packed);
        let wait = self.timeout.max(Duration::from_millis(250));
        let outcome = tokio::time::timeout(wait, call.invoke_async::<i64>(&mut connection)).await;
        let failure = match outcome {
            Ok(Ok(_)) => return,
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {wait:?}"),
        };
        // Debug: a refund fails when Redis does, which is logged (at a bounded rate) already.
        tracing::debug!(target: "reset_guard::limit", group = group.name(), error = failure, "a refund of a group decided after a denial failed; that group counts one request more until its key expires");
    }
}
