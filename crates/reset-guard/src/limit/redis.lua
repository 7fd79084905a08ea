-- One request's rate-limit decision, evaluated atomically on the Redis server.
--
-- KEYS: one per quota, group after group, in request order.
-- ARGV[1]: the number of groups; then, per group, its quota count followed by
--          interval_us, capacity_us and shadow (0/1) for each quota.
--
-- Groups are decided in order with GCRA (the same arithmetic as limit/gcra.rs, in
-- microseconds of the server's own clock, so replicas need no clock sync). A group
-- charges none of its quotas unless every enforced one admits; the first group that
-- denies ends the evaluation, and the groups before it stay charged.
--
-- Returns {1, group, quota, retry_us, shadow_mask} for a denial, or
--         {0, group, quota, remaining, reset_us, shadow_mask} for the tightest admitting
--         quota (group 0: none), where shadow_mask has bit g-1 set when a shadow quota of
--         group g would have denied.

-- Redis before 7 needs this to write after reading TIME (effects replication).
pcall(redis.replicate_commands)

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local function int(n)
  return string.format('%.0f', n)
end

local groups = tonumber(ARGV[1])
local a, k = 2, 1
local shadowed = {}
local tight_g, tight_q, tight_rem, tight_reset = 0, 0, -1, 0

local function shadow_mask()
  local mask = 0
  for g, _ in pairs(shadowed) do
    mask = mask + 2 ^ (g - 1)
  end
  return mask
end

for g = 1, groups do
  local n = tonumber(ARGV[a])
  a = a + 1
  local interval, capacity, shadow, new_tat, ahead = {}, {}, {}, {}, {}
  local deny_q, deny_retry = 0, -1
  for q = 1, n do
    interval[q] = tonumber(ARGV[a])
    capacity[q] = tonumber(ARGV[a + 1])
    shadow[q] = ARGV[a + 2] == '1'
    a = a + 3
    local stored = redis.call('GET', KEYS[k + q - 1])
    local tat = stored and tonumber(stored) or 0
    if tat < now then
      tat = now
    end
    local candidate = tat + interval[q]
    local lead = candidate - now
    if lead > capacity[q] then
      if shadow[q] then
        shadowed[g] = true
      elseif lead - capacity[q] > deny_retry then
        deny_q, deny_retry = q, lead - capacity[q]
      end
    else
      new_tat[q], ahead[q] = candidate, lead
    end
  end
  if deny_q > 0 then
    return {1, g, deny_q, deny_retry, shadow_mask()}
  end
  for q = 1, n do
    if new_tat[q] then
      -- The key expires once its TAT passes: from then on it equals no state at all.
      redis.call('SET', KEYS[k + q - 1], int(new_tat[q]), 'PX', int(math.floor(ahead[q] / 1000) + 1))
      if not shadow[q] then
        local remaining = math.floor((capacity[q] - ahead[q]) / interval[q])
        if tight_rem < 0 or remaining < tight_rem then
          tight_g, tight_q, tight_rem, tight_reset = g, q, remaining, ahead[q]
        end
      end
    end
  end
  k = k + n
end
return {0, tight_g, tight_q, tight_rem, tight_reset, shadow_mask()}
