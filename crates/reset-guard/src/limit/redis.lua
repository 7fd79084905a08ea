-- Rate-limit decisions for a batch of requests, evaluated atomically on the Redis server.
--
-- A key holds the state of one group for one keyed hash (an address, a client, an IP, or
-- the one global key): for each quota of the group, its interval_us, capacity_us and TAT,
-- packed as little-endian doubles, three per quota. One key per group rather than one per
-- quota: a new address writes one key where it wrote one per quota, which in Redis (and in
-- every replica applying the same writes) costs far more than the bytes it holds.
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
--   the key's group: a TAT the batch uses; slots are numbered from 1 across the table)
--   interval_us, capacity_us, the count of its lineage, and per quota of the lineage its
--   interval_us and capacity_us: the quotas it replaced in reloads, the latest first, and
--   which each of them had replaced.
--
-- A quota with a lineage counts what its key still holds under a quota of the lineage:
-- the nearest one held, its backlog carried forward quota by quota to the slot's own (in
-- requests, at each quota's interval, at most its burst: the memory store's carry over a
-- reload), and the slot's own TAT if that is further along. So a reload needs no pass
-- over Redis: an address is carried over when it is next asked about, whichever replica
-- asks. A written key keeps the quotas the batch did not use (another replica's, before or
-- after a reload of its own) while they still count.
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

local packed = ARGV[1]
local nums = {unpack_doubles(doubles(#packed / 8), packed)}

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
  local count = nums[p]
  p = p + 1
  local value = values[k]
  if not value then
    -- A new key (most keys of new addresses): every slot starts afresh.
    for _ = 1, count do
      s = s + 1
      tats[s] = 0
      p = p + 3 + 2 * nums[p + 2]
    end
  else
    local n_stored = #value / 8
    n_stored = n_stored - n_stored % 3
    local stored = {unpack_doubles(doubles(n_stored), value)}
    local key_at, used = p, 0
    for _ = 1, count do
      s = s + 1
      local interval, capacity, lineage = nums[p], nums[p + 1], nums[p + 2]
      local tat = 0
      for t = 1, n_stored, 3 do
        if stored[t] == interval and stored[t + 1] == capacity then
          tat, used = stored[t + 2], used + 1
          break
        end
      end
      -- The nearest quota of the lineage the key holds, carried forward to this one.
      local a = p + 3
      for j = 1, lineage do
        local from_interval, from_capacity, from = nums[a + 2 * j - 2], nums[a + 2 * j - 1], nil
        for t = 1, n_stored, 3 do
          if stored[t] == from_interval and stored[t + 1] == from_capacity then
            from = stored[t + 2]
            break
          end
        end
        if from then
          local lead = from - now
          if lead > 0 then
            for step = j, 1, -1 do
              local to_interval, to_capacity = interval, capacity
              if step > 1 then
                to_interval, to_capacity = nums[a + 2 * step - 4], nums[a + 2 * step - 3]
              end
              lead = lead * to_interval / nums[a + 2 * step - 2]
              lead = lead - lead % 1
              if lead > to_capacity then
                lead = to_capacity
              end
            end
            if now + lead > tat then
              tat = now + lead
            end
          end
          break
        end
      end
      tats[s] = tat
      p = a + 2 * lineage
    end
    if n_stored > 3 * used then
      -- Quotas no slot uses: kept while they still count.
      local others, n = nil, 0
      for t = 1, n_stored, 3 do
        if stored[t + 2] > now then
          local mine, at = false, key_at
          for _ = 1, count do
            if nums[at] == stored[t] and nums[at + 1] == stored[t + 1] then
              mine = true
              break
            end
            at = at + 3 + 2 * nums[at + 2]
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
  local count = nums[p]
  p = p + 1
  local first = s + 1
  s = s + count
  local changed = false
  for i = first, s do
    if dirty[i] then
      changed = true
      break
    end
  end
  local others = kept and kept[k]
  if not changed then
    for _ = 1, count do
      p = p + 3 + 2 * nums[p + 2]
    end
  elseif count == 1 and not others then
    -- One quota, just charged (most keys).
    local tat = tats[first]
    local ttl = (tat - now) / 1000
    call('PSETEX', keys[k], format('%d', ttl - ttl % 1 + 1), pack('<ddd', nums[p], nums[p + 1], tat))
    p = p + 3 + 2 * nums[p + 2]
  else
    row = row or {}
    local n, latest = 0, now
    for i = first, s do
      local tat = tats[i]
      if tat > now then
        row[n + 1], row[n + 2], row[n + 3] = nums[p], nums[p + 1], tat
        n = n + 3
        if tat > latest then
          latest = tat
        end
      end
      p = p + 3 + 2 * nums[p + 2]
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
