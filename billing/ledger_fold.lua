-- Fold one batch of usage records into their windows' ledgers (billing/ledger.py, Ledger.fold).
-- One script per batch: the batch lands whole, or (Redis down) not at all.
--
-- KEYS[1]       the usage stream                  KEYS[2]  the dead-letter stream
-- KEYS[3]       open windows (zset, score ready ms) KEYS[4]  ledger index (zset, score start)
-- KEYS[4+2w-1]  window w's ledger hash            KEYS[4+2w] window w's dispatch-id hash
-- ARGV[1] the consumer group
-- ARGV[2] number of bad entries, then per bad entry: entry id, error code
-- then the number of windows, then per window:
--   member, start (s), ready (ms), record count, pico-USD total, unit-total count,
--   (unit, total)..., then per record: dispatch id, entry id, pico-USD, unit count, (unit, n)...
--
-- A record is new when its dispatch id is not in the window's id hash: it is added to the
-- collecting segment `cur` (HINCRBY on integers given as strings: exact 64-bit sums, never
-- Lua doubles). A known dispatch id is a no-op, which makes re-folding a redelivered or
-- reclaimed entry harmless; the entry stays pending and is acknowledged with its segment. An
-- entry carrying an already-known dispatch id under another entry id (a duplicate in the
-- stream), or whose segment is already settled, is acknowledged at once: it is billed once.
-- Bad entries (undecodable) are copied to the dead-letter stream and acknowledged.
-- Returns {new records, duplicates acknowledged, dead-lettered, redelivered (no-ops)}.
local stream, dead, open, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group = ARGV[1]
local a = 2

local function dead_letter(id, code)
  local fields = {'entry', id, 'code', code}
  local found = redis.call('XRANGE', stream, id, id)
  if #found > 0 then
    for _, v in ipairs(found[1][2]) do fields[#fields + 1] = v end
  end
  redis.call('XADD', dead, '*', unpack(fields))
  redis.call('XACK', stream, group, id)
end

local nbad = tonumber(ARGV[a]); a = a + 1
for _ = 1, nbad do
  dead_letter(ARGV[a], ARGV[a + 1]); a = a + 2
end

local new, dups, again = 0, 0, 0
local nwin = tonumber(ARGV[a]); a = a + 1
for w = 1, nwin do
  local win, ids = KEYS[3 + 2 * w], KEYS[4 + 2 * w]
  local member, start, ready = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local nrec, total, nunits = tonumber(ARGV[a + 3]), ARGV[a + 4], tonumber(ARGV[a + 5])
  a = a + 6
  local totals = a
  a = a + 2 * nunits
  local cur = redis.call('HGET', win, 'cur')
  if not cur then
    cur = '0'
    redis.call('HSET', win, 'cur', cur)
  end
  local fresh, all_new = {}, true
  for _ = 1, nrec do
    local did, eid = ARGV[a], ARGV[a + 1]
    if redis.call('HSETNX', ids, did, cur .. ':' .. eid) == 1 then
      fresh[#fresh + 1] = a
    else
      all_new = false
      local seg, seen = string.match(redis.call('HGET', ids, did), '^(%d+):(.*)$')
      local status = redis.call('HGET', win, 's:' .. seg)
      if seen ~= eid or status == 'sent' or status == 'dead' then
        redis.call('XACK', stream, group, eid)
        dups = dups + 1
      else
        again = again + 1
      end
    end
    a = a + 4 + 2 * tonumber(ARGV[a + 3])
  end
  if #fresh > 0 then
    if all_new then  -- the usual case: the batch's totals, computed exactly by the caller
      redis.call('HINCRBY', win, 'p:' .. cur, total)
      redis.call('HINCRBY', win, 'n:' .. cur, nrec)
      for u = 0, nunits - 1 do
        local at = totals + 2 * u
        redis.call('HINCRBY', win, 'u:' .. cur .. ':' .. ARGV[at], ARGV[at + 1])
      end
    else
      for _, at in ipairs(fresh) do
        redis.call('HINCRBY', win, 'p:' .. cur, ARGV[at + 2])
        redis.call('HINCRBY', win, 'n:' .. cur, 1)
        for u = 0, tonumber(ARGV[at + 3]) - 1 do
          local ua = at + 4 + 2 * u
          redis.call('HINCRBY', win, 'u:' .. cur .. ':' .. ARGV[ua], ARGV[ua + 1])
        end
      end
    end
    new = new + #fresh
    -- the window closes `grace` after its last fold (and not before its end): GT only raises
    redis.call('ZADD', open, 'GT', ready, member)
    redis.call('ZADD', index, 'NX', start, member)
    -- a settled window's keys expire (billing/ledger.py): not while it holds unsent usage
    redis.call('PERSIST', win)
    redis.call('PERSIST', ids)
  end
end
return {new, dups, nbad, again}
