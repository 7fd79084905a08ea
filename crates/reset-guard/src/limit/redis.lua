-- Rate-limit decisions for a batch of requests, evaluated atomically on the Redis server.
--
-- ARGV[1]: the number of requests. ARGV[2]: the number of quota sets, each the quotas of
--          one group: its quota count, then interval_us, capacity_us and shadow (0/1) per
--          quota. ARGV[3]: how many keys follow in ARGV (0: the keys are KEYS). Then those
--          keys, then the quota sets, then, per request: its group count and the quota set
--          of each group.
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

-- Redis before 7 needs this to write after reading TIME (effects replication).
pcall(redis.replicate_commands)

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- '%d' prints through a C long (64 bits), far cheaper than '%.0f'; TATs are whole
-- microseconds, well within both.
local function int(n)
  return string.format('%d', n)
end

local out, n_out = {}, 0
local function put(v)
  n_out = n_out + 1
  out[n_out] = v
end

-- Each request's small numbers (its group count and quota sets) repeat from request to
-- request: each distinct string is converted once (Lua's tonumber goes through strtod).
local small = {}
local function num(s)
  local n = small[s]
  if not n then
    n = tonumber(s)
    small[s] = n
  end
  return n
end

-- The keys: declared, or passed in ARGV.
local keys = KEYS
local in_argv = tonumber(ARGV[3])
if in_argv > 0 then
  keys = {}
  for i = 1, in_argv do
    keys[i] = ARGV[3 + i]
  end
end

-- The quota sets, read once for the whole batch.
local sets = {}
local a = 4 + in_argv
for id = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[a])
  local set = {n = n, interval = {}, capacity = {}, shadow = {}}
  for q = 1, n do
    set.interval[q] = tonumber(ARGV[a + 3 * q - 2])
    set.capacity[q] = tonumber(ARGV[a + 3 * q - 1])
    set.shadow[q] = ARGV[a + 3 * q] == '1'
  end
  sets[id] = set
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
    local served, value = pcall(redis.call, 'GET', order[i])
    if not served then
      return {-1}
    end
    tats[i] = value and tonumber(value) or 0
  end
elseif n_order > 0 then
  local values = redis.call('MGET', unpack(order))
  for i = 1, n_order do
    tats[i] = values[i] and tonumber(values[i]) or 0
  end
end

local k = 1
local new_tat = {}

local function decide()
  local shadowed = 0
  local near = 0
  local tight_g, tight_q, tight_rem, tight_reset = 0, 0, -1, 0
  local groups = num(ARGV[a])
  local first_arg = a + 1
  a = a + 1 + groups
  local denial = false
  for g = 1, groups do
    local set = sets[num(ARGV[first_arg + g - 1])]
    local n = set.n
    if not denial then
      local interval, capacity, shadow = set.interval, set.capacity, set.shadow
      local deny_q, deny_retry, shadow_hit = 0, -1, false
      for q = 1, n do
        local tat = tats[at[k + q - 1]]
        if tat < now then
          tat = now
        end
        local candidate = tat + interval[q]
        local lead = candidate - now
        if lead > capacity[q] then
          new_tat[q] = false
          if shadow[q] then
            shadow_hit = true
          elseif lead - capacity[q] > deny_retry then
            deny_q, deny_retry = q, lead - capacity[q]
          end
        else
          new_tat[q] = candidate
        end
      end
      if shadow_hit then
        shadowed = shadowed + 2 ^ (g - 1)
      end
      if deny_q > 0 then
        denial = true
        put(1)
        put(g)
        put(deny_q)
        put(deny_retry)
        put(0)
      else
        for q = 1, n do
          if new_tat[q] then
            local i = at[k + q - 1]
            tats[i] = new_tat[q]
            dirty[i] = true
            local lead = new_tat[q] - now
            local remaining = math.floor((capacity[q] - lead) / interval[q])
            if remaining * 5 < capacity[q] / interval[q] then
              near = near + 2 ^ (4 * (g - 1) + q - 1)
            end
            if not shadow[q] then
              if tight_rem < 0 or remaining < tight_rem then
                tight_g, tight_q, tight_rem, tight_reset = g, q, remaining, lead
              end
            end
          end
        end
      end
    end
    k = k + n
  end
  if not denial then
    put(0)
    put(tight_g)
    put(tight_q)
    put(math.max(tight_rem, 0))
    put(tight_reset)
  end
  put(shadowed)
  put(near)
end

for _ = 1, tonumber(ARGV[1]) do
  decide()
end

-- Each changed key once, with its final TAT; it expires once that TAT passes, and from
-- then on equals no state at all.
for i = 1, n_order do
  if dirty[i] then
    local tat = tats[i]
    redis.call('SET', order[i], int(tat), 'PX', math.floor((tat - now) / 1000) + 1)
  end
end
return out
