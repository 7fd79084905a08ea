-- Rate-limit decisions for a batch of requests, evaluated atomically on the Redis server.
--
-- A key holds the state of one group for one keyed hash (an address, a client, an IP, or
-- the one global key): for each quota of the group, its interval_us, capacity_us and TAT,
-- packed as little-endian doubles, three per quota. One key per group rather than one per
-- quota: a new address writes one key where it wrote one per quota, and a write of a new
-- key (a `PSETEX` from the script, and the same write on every replica) is most of what a
-- request costs Redis (benches/README.md, "One key per group and address").
--
-- The keys: each distinct key of the batch once, as KEYS, or in ARGV after the numbers
-- (see below).
-- ARGV[1]: every number of the call, packed as little-endian doubles, read with one C call
--          (one argument per number would cost Redis a string object, a Lua string and a
--          strtod each):
--   nums[1]  the number of requests
--   nums[2]  how many keys follow in ARGV (0: the keys are KEYS)
--   nums[3]  where in nums the first request starts
--   nums[4]  where in nums the slot table starts
--   then the quota sets, each the quotas of one group: its quota count, then interval_us,
--   capacity_us and shadow (0/1) per quota;
--   then per request: its group count, and per group the position in nums of its quota
--   set's count followed by the slot of each quota;
--   then the slot table: per key, in key order, its slot count, and per slot (a quota of
--   the key's group whose TAT the batch uses; slots are numbered from 1 across the table)
--   where in nums a quota set holds its interval_us and capacity_us.
--
-- A written key keeps the quotas the batch did not use (another replica's, before or
-- after a reload of its own) while they still count. A reload's changed quotas are
-- carried over by the gateway's walk (limit/redis/carry.rs), in the same format.
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
-- so the gateway does the bookkeeping it can (distinct keys, where each set starts, each
-- key's slots side by side) and the script makes no table per request, and one per key
-- only for a key that holds a value.

-- Redis before 7 needs this to write after reading TIME (effects replication).
pcall(redis.replicate_commands)

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local call, format, pack, unpack_doubles = redis.call, string.format, struct.pack, struct.unpack

-- struct's format for n doubles: literals for what a key of one or two quotas holds (no
-- string to make), made otherwise.
local function doubles(n)
  if n == 3 then
    return '<ddd'
  elseif n == 6 then
    return '<dddddd'
  end
  return '<' .. string.rep('d', n)
end

-- The call's numbers. Lua returns at most about 8,000 values from one call; the largest
-- call (128 requests, each of four groups of four quotas on keys of its own) has about
-- 5,300, and a call of more than 4,000 is read in parts, to stay clear of the limit.
local packed = ARGV[1]
local count = #packed / 8
local nums
if count <= 4000 then
  nums = {unpack_doubles(doubles(count), packed)}
else
  nums = {}
  local format_of_part = doubles(1000)
  for first = 0, count - 1, 1000 do
    local part = count - first
    local values = {unpack_doubles(part < 1000 and doubles(part) or format_of_part, packed, 8 * first + 1)}
    for i = 1, (part < 1000 and part or 1000) do
      nums[first + i] = values[i]
    end
  end
end

-- Every key's value, read before anything is written.
local keys, values = KEYS, {}
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
    values[i] = value
  end
elseif #keys > 0 then
  values = call('MGET', unpack(keys))
end

-- Every slot's TAT, numbered as the slot table lists them; per key (only where there are
-- any), what it holds that no slot uses.
local tats, dirty, kept = {}, {}, nil
local p, s = nums[4], 0
for k = 1, #keys do
  local slots = nums[p]
  local key_at = p + 1
  p = key_at + slots
  local value = values[k]
  if not value then
    -- A new key (most keys of new addresses): every slot starts afresh.
    for _ = 1, slots do
      s = s + 1
      tats[s] = 0
    end
  else
    -- At most 333 quotas read (no key the gateway writes comes near): Lua returns at most
    -- about 8,000 values from one call, and a longer value, which only something else can
    -- have written, would fail every call that reads it.
    local n_stored = #value / 8
    if n_stored > 999 then
      n_stored = 999
    end
    n_stored = n_stored - n_stored % 3
    local stored = {unpack_doubles(doubles(n_stored), value)}
    local used = 0
    for at = key_at, p - 1 do
      s = s + 1
      local q = nums[at]
      local interval, capacity = nums[q], nums[q + 1]
      local tat = 0
      for t = 1, n_stored, 3 do
        if stored[t] == interval and stored[t + 1] == capacity then
          tat, used = stored[t + 2], used + 1
          -- A GCRA state is never further ahead than its capacity: a value that is
          -- (written by something else, or not a number) counts as a full burst spent.
          if not (tat <= now + capacity) then
            tat = now + capacity
          end
          break
        end
      end
      tats[s] = tat
    end
    if n_stored > 3 * used then
      -- Quotas no slot uses: kept while they still count, and only if they read as a
      -- state (no further ahead than its capacity, which no quota makes 2^53 us).
      local others, n = nil, 0
      for t = 1, n_stored, 3 do
        local tat = stored[t + 2]
        if tat > now and tat <= now + stored[t + 1] and stored[t + 1] < 9007199254740992 then
          local mine = false
          for at = key_at, p - 1 do
            local q = nums[at]
            if nums[q] == stored[t] and nums[q + 1] == stored[t + 1] then
              mine = true
              break
            end
          end
          if not mine then
            others = others or {}
            others[n + 1], others[n + 2], others[n + 3] = stored[t], stored[t + 1], stored[t + 2]
            n = n + 3
          end
        end
      end
      if others then
        kept = kept or {}
        kept[k] = others
      end
    end
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

-- Each changed key once, with every quota of its group that still counts ('%d' prints
-- through a C long, far cheaper than the formatting of a number argument); it expires
-- once its last TAT passes, and from then on equals no state at all. PSETEX rather than
-- SET ... PX: no options to parse.
local row
p, s = nums[4], 0
for k = 1, #keys do
  local slots = nums[p]
  local key_at = p + 1
  p = key_at + slots
  local first = s + 1
  s = s + slots
  local changed = false
  for i = first, s do
    if dirty[i] then
      changed = true
      break
    end
  end
  local others = kept and kept[k]
  if changed and slots == 1 and not others then
    -- One quota, just charged (most keys).
    local tat, q = tats[first], nums[key_at]
    local ttl = (tat - now) / 1000
    call('PSETEX', keys[k], format('%d', ttl - ttl % 1 + 1), pack('<ddd', nums[q], nums[q + 1], tat))
  elseif changed then
    row = row or {}
    local n, latest = 0, now
    for i = first, s do
      local tat = tats[i]
      if tat > now then
        local q = nums[key_at + i - first]
        row[n + 1], row[n + 2], row[n + 3] = nums[q], nums[q + 1], tat
        n = n + 3
        if tat > latest then
          latest = tat
        end
      end
    end
    if others then
      for t = 1, #others, 3 do
        row[n + 1], row[n + 2], row[n + 3] = others[t], others[t + 1], others[t + 2]
        n = n + 3
        if others[t + 2] > latest then
          latest = others[t + 2]
        end
      end
    end
    local ttl = (latest - now) / 1000
    call('PSETEX', keys[k], format('%d', ttl - ttl % 1 + 1), pack(doubles(n), unpack(row, 1, n)))
  end
end
return pack(doubles(n_out), unpack(out, 1, n_out))
