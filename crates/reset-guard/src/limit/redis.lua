-- Rate-limit decisions for a batch of requests, evaluated atomically on the Redis server.
--
-- The keys: each distinct key of the batch once, as KEYS, or in ARGV after the numbers
-- (see below).
-- ARGV[1]: every number of the call, packed as little-endian doubles, read with one C call
--          (one argument per number would cost Redis a string object, a Lua string and a
--          strtod each):
--   nums[1]  the number of requests
--   nums[2]  how many keys follow in ARGV (0: the keys are KEYS)
--   nums[3]  where in nums the first request starts
--   then the quota sets, each the quotas of one group: its quota count, then interval_us,
--   capacity_us and shadow (0/1) per quota;
--   then per request: its group count, and per group the position in nums of its quota
--   set's count followed by the index (from 1) of each quota's key.
--
-- Declared keys (KEYS) must share one slot in a Redis Cluster. Keys passed in ARGV let one
-- call decide requests whose keys live in different slots of one cluster node (Redis 7's
-- allow-cross-slot-keys flag, which the gateway then puts on the script's first line). Such
-- a call first reads every key; if one is not served here (the slot moved, or is moving),
-- it returns {-1} before writing anything, and the gateway decides those requests again
-- slot by slot.
--
-- Each request's groups are decided in order with GCRA (the same arithmetic as
-- limit/gcra.rs, in microseconds of the server's own clock, so replicas need no clock
-- sync). A group charges none of its quotas unless every enforced one admits; the first
-- group that denies ends that request's evaluation, and the groups before it stay charged.
-- Every key is read once and written once (its final value) for the whole batch.
--
-- Returns seven numbers per request, packed as little-endian doubles in one string (one
-- bulk reply for the gateway to read rather than an integer reply each):
--   {1, group, quota, retry_us, 0, shadow_mask, near_mask} for a denial, or
--   {0, group, quota, remaining, reset_us, shadow_mask, near_mask} for the tightest
--   admitting quota (group 0: none; on a tie the later quota, as the memory store), where
--   shadow_mask has bit g-1 set when a shadow quota of group g would have denied a request
--   the group admitted (what promoting it would add), and
--   near_mask has bit 4(g-1)+(q-1) set when quota q of group g admitted and was left with
--   less than a fifth of its burst (limit.rs near_limit).
--
-- Written for the cost of Redis's Lua: every table and string made costs an allocation and
-- the garbage collector's work later (about a thousand instructions for an empty table),
-- so the gateway does the bookkeeping it can (distinct keys, where each set starts) and
-- the script makes no table per request.

-- Redis before 7 needs this to write after reading TIME (effects replication).
pcall(redis.replicate_commands)

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local call, format = redis.call, string.format

local packed = ARGV[1]
local nums = {struct.unpack('<' .. string.rep('d', #packed / 8), packed)}

-- Every key's TAT, read before anything is written.
local keys, tats, dirty = KEYS, {}, {}
local in_argv = nums[2]
if in_argv > 0 then
  keys = {}
  for i = 1, in_argv do
    local key = ARGV[1 + i]
    local served, value = pcall(call, 'GET', key)
    if not served then
      return {-1}
    end
    keys[i] = key
    tats[i] = value and tonumber(value) or 0
  end
elseif #keys > 0 then
  local values = call('MGET', unpack(keys))
  for i = 1, #keys do
    local value = values[i]
    tats[i] = value and tonumber(value) or 0
  end
end

local out, n_out = {}, 0
-- The TATs of a group of several quotas before it is charged.
local before = {}
local a = nums[3]
for _ = 1, nums[1] do
  local shadowed, near = 0, 0
  local tight_g, tight_q, tight_rem, tight_reset = 0, 0, -1, 0
  local denied = false
  -- 2^(g-1) and 16^(g-1): group g's shadow bit and the near bit of its first quota.
  local g_bit, g_near = 1, 1
  local groups = nums[a]
  a = a + 1
  for g = 1, groups do
    local set = nums[a]
    local n = nums[set]
    if not denied then
      local deny_q, deny_retry = 0, -1
      if n > 1 then
        -- Several quotas: none is charged unless every enforced one admits; the one that
        -- would wait longest denies.
        for q = 1, n do
          local i = nums[a + q]
          local tat = tats[i]
          before[i] = tat
          if tat < now then
            tat = now
          end
          local p = set + 3 * q - 2
          local over = tat + nums[p] - now - nums[p + 1]
          if over > 0 then
            if nums[p + 2] == 1 then
              if shadowed % (2 * g_bit) < g_bit then
                shadowed = shadowed + g_bit
              end
            elseif over > deny_retry then
              deny_q, deny_retry = q, over
            end
          end
        end
      end
      if deny_q == 0 then
        -- Charge every quota that admits (a shadow quota over its limit is not charged).
        -- A group of one quota (most groups) is decided in this one pass.
        local q_bit = g_near
        for q = 1, n do
          local i = nums[a + q]
          -- Several quotas: each reckoned from the state before the group, so that two
          -- with the same numbers, which share one key, charge it once (the memory store's
          -- two states move in step).
          local tat = n > 1 and before[i] or tats[i]
          if tat < now then
            tat = now
          end
          local p = set + 3 * q - 2
          local interval, capacity = nums[p], nums[p + 1]
          local lead = tat + interval - now
          if lead <= capacity then
            tats[i] = tat + interval
            dirty[i] = true
            local left = (capacity - lead) / interval
            local remaining = left - left % 1
            if remaining * 5 < capacity / interval then
              near = near + q_bit
            end
            -- On a tie, the later quota (as the memory store).
            if nums[p + 2] ~= 1 and (tight_rem < 0 or remaining <= tight_rem) then
              tight_g, tight_q, tight_rem, tight_reset = g, q, remaining, lead
            end
          elseif nums[p + 2] == 1 then
            if shadowed % (2 * g_bit) < g_bit then
              shadowed = shadowed + g_bit
            end
          else
            -- Only a group of one quota gets here: with several, the pass above found
            -- every enforced quota admitting.
            deny_q, deny_retry = q, lead - capacity
          end
          q_bit = q_bit * 2
        end
      end
      if deny_q > 0 then
        -- Denied by an enforced quota: what a shadow quota thought of it does not count.
        if shadowed % (2 * g_bit) >= g_bit then
          shadowed = shadowed - g_bit
        end
        denied = true
        out[n_out + 1] = 1
        out[n_out + 2] = g
        out[n_out + 3] = deny_q
        out[n_out + 4] = deny_retry
        out[n_out + 5] = 0
        n_out = n_out + 5
      end
    end
    a = a + 1 + n
    g_bit, g_near = g_bit * 2, g_near * 16
  end
  if not denied then
    out[n_out + 1] = 0
    out[n_out + 2] = tight_g
    out[n_out + 3] = tight_q
    out[n_out + 4] = tight_rem > 0 and tight_rem or 0
    out[n_out + 5] = tight_reset
    n_out = n_out + 5
  end
  out[n_out + 1] = shadowed
  out[n_out + 2] = near
  n_out = n_out + 2
end

-- Each changed key once, with its final TAT ('%d' prints through a C long, far cheaper
-- than the formatting of a number argument); it expires once that TAT passes, and from
-- then on equals no state at all. PSETEX rather than SET ... PX: no options to parse.
for i = 1, #keys do
  if dirty[i] then
    local tat = tats[i]
    local ttl = (tat - now) / 1000
    call('PSETEX', keys[i], format('%d', ttl - ttl % 1 + 1), format('%d', tat))
  end
end
return struct.pack('<' .. string.rep('d', n_out), unpack(out, 1, n_out))
