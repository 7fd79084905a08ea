-- Rate-limit decisions for a batch of requests, evaluated atomically on the Redis server.
--
-- ARGV[1]: every number of the call, packed as little-endian doubles (one argument and one
--          C call to read them, where one argument per number costs Redis a string object,
--          a Lua string and a strtod each): the number of requests; the number of quota
--          sets; how many keys follow in ARGV (0: the keys are KEYS); the quota sets, each
--          the quotas of one group: its quota count, then interval_us, capacity_us and
--          shadow (0/1) per quota; then, per request, its group count and the quota set of
--          each group.
-- ARGV[2...]: the keys, when they are passed in ARGV.
-- The keys: one per quota, request after request, group after group, in request order.
--
-- Every key is read once and written once (its final value) for the whole batch: hot keys
-- such as the global quota's are shared by every request in it.
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
--
-- Returns seven numbers per request:
--   {1, group, quota, retry_us, 0, shadow_mask, near_mask} for a denial, or
--   {0, group, quota, remaining, reset_us, shadow_mask, near_mask} for the tightest
--   admitting quota (group 0: none), where shadow_mask has bit g-1 set when a shadow quota
--   of group g would have denied, and near_mask has bit 4(g-1)+(q-1) set when quota q of
--   group g admitted and was left with less than a fifth of its burst (limit.rs
--   near_limit).
--
-- Written for Redis's Lua interpreter, where every table, closure and string conversion
-- shows in the cost of a call: the quota sets are read in place from the numbers, and the
-- requests are decided in one loop.

-- Redis before 7 needs this to write after reading TIME (effects replication).
pcall(redis.replicate_commands)

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local floor, format, call = math.floor, string.format, redis.call

local packed = ARGV[1]
local nums = {struct.unpack('<' .. string.rep('d', #packed / 8), packed)}
local n_requests, n_sets, in_argv = nums[1], nums[2], nums[3]

-- The keys: declared, or passed in ARGV.
local keys = KEYS
if in_argv > 0 then
  keys = {}
  for i = 1, in_argv do
    keys[i] = ARGV[1 + i]
  end
end

-- Where each quota set starts in `nums` (its first quota's interval_us), and its size.
local set_at, set_n = {}, {}
local a = 4
for id = 1, n_sets do
  local n = nums[a]
  set_n[id] = n
  set_at[id] = a + 1
  a = a + 1 + 3 * n
end

-- Every distinct key, read once, before anything is written. Each key is looked up by its
-- string once: `at[j]` is the position of the j-th key among the distinct ones, whose
-- state lives in arrays by that position.
local order, position, at, n_order = {}, {}, {}, 0
for j = 1, #keys do
  local key = keys[j]
  local i = position[key]
  if not i then
    n_order = n_order + 1
    i = n_order
    position[key] = i
    order[i] = key
  end
  at[j] = i
end
local tats, dirty = {}, {}
if in_argv > 0 then
  for i = 1, n_order do
    local served, value = pcall(call, 'GET', order[i])
    if not served then
      return {-1}
    end
    tats[i] = value and tonumber(value) or 0
  end
elseif n_order > 0 then
  local values = call('MGET', unpack(order))
  for i = 1, n_order do
    local value = values[i]
    tats[i] = value and tonumber(value) or 0
  end
end

-- bit[i] = 2^(i-1), for the shadow and near masks.
local bit = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768}
local out, n_out = {}, 0
local new_tat = {}
local k = 1
for _ = 1, n_requests do
  local shadowed, near = 0, 0
  local tight_g, tight_q, tight_rem, tight_reset = 0, 0, -1, 0
  local groups = nums[a]
  local first = a + 1
  a = first + groups
  local denied = false
  for g = 1, groups do
    local id = nums[first + g - 1]
    local n = set_n[id]
    if not denied then
      local p = set_at[id]
      local deny_q, deny_retry, shadow_hit = 0, -1, false
      for q = 1, n do
        local tat = tats[at[k + q - 1]]
        if tat < now then
          tat = now
        end
        local qp = p + 3 * q - 3
        local candidate = tat + nums[qp]
        local over = candidate - now - nums[qp + 1]
        if over > 0 then
          new_tat[q] = false
          if nums[qp + 2] == 1 then
            shadow_hit = true
          elseif over > deny_retry then
            deny_q, deny_retry = q, over
          end
        else
          new_tat[q] = candidate
        end
      end
      if shadow_hit then
        shadowed = shadowed + bit[g]
      end
      if deny_q > 0 then
        denied = true
        out[n_out + 1] = 1
        out[n_out + 2] = g
        out[n_out + 3] = deny_q
        out[n_out + 4] = deny_retry
        out[n_out + 5] = 0
        n_out = n_out + 5
      else
        for q = 1, n do
          local candidate = new_tat[q]
          if candidate then
            local i = at[k + q - 1]
            tats[i] = candidate
            dirty[i] = true
            local qp = p + 3 * q - 3
            local interval, capacity = nums[qp], nums[qp + 1]
            local lead = candidate - now
            local remaining = floor((capacity - lead) / interval)
            if remaining * 5 < capacity / interval then
              near = near + bit[4 * g - 4 + q]
            end
            if nums[qp + 2] ~= 1 and (tight_rem < 0 or remaining < tight_rem) then
              tight_g, tight_q, tight_rem, tight_reset = g, q, remaining, lead
            end
          end
        end
      end
    end
    k = k + n
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
-- than Lua's own number formatting); it expires once that TAT passes, and from then on
-- equals no state at all.
for i = 1, n_order do
  if dirty[i] then
    local tat = tats[i]
    call('SET', order[i], format('%d', tat), 'PX', format('%d', floor((tat - now) / 1000) + 1))
  end
end
return out
