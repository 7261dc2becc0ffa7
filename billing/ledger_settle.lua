-- Settle a sealed segment once Stripe answered for it (billing/ledger.py, Ledger.settle):
-- record the outcome in the window's ledger and acknowledge the segment's records, in one
-- atomic step, so a record is never acknowledged without its segment marked settled, nor the
-- reverse (a crash in between would otherwise lose it, or bill it again after 24 hours).
--
-- KEYS[1] window ledger hash  KEYS[2] window dispatch-id hash  KEYS[3] usage stream
-- KEYS[4] dead-letter stream  KEYS[5] open windows (zset)      KEYS[6] window lock
-- ARGV[1] consumer group      ARGV[2] window member            ARGV[3] lock token
-- ARGV[4] segment             ARGV[5] outcome: 'sent' | 'dead'
-- ARGV[6] customer id         ARGV[7] error code ('' when sent)
-- ARGV[8] dispatch-id TTL (s) ARGV[9] ledger TTL (s)           ARGV[10] '1': release the lock
-- ARGV[11] number of accepted meter events, then (meter, identifier, value) per event
--
-- 'sent': Stripe accepted every event of the segment (or reported it a duplicate of an
-- accepted one). 'dead': Stripe refused the segment for good; its records are copied to the
-- dead-letter stream with the code and the window, then acknowledged, and events Stripe did
-- accept for it (if any) are still recorded as accepted. A segment already settled (by
-- another worker) is left as it is. When the window has nothing left to send it leaves the
-- open set and its keys get their TTLs. Returns the number of records acknowledged.
local win, ids, stream, dead, open, lock = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local group, member, token, seg, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local acked = 0

if redis.call('HGET', win, 's:' .. seg) == 'sealed' then
  redis.call('HSET', win, 's:' .. seg, outcome, 'c:' .. seg, ARGV[6])
  if outcome == 'dead' then
    redis.call('HSET', win, 'e:' .. seg, ARGV[7])
  end
  local nev = tonumber(ARGV[11])
  for e = 0, nev - 1 do
    local at = 12 + 3 * e
    redis.call('HSET', win, 'v:' .. seg .. ':' .. ARGV[at], ARGV[at + 2],
      'id:' .. seg .. ':' .. ARGV[at], ARGV[at + 1])
  end
  -- the segment's entries: the dispatch-id hash maps each record to '<segment>:<entry id>'
  local prefix = seg .. ':'
  local entries = {}
  local all = redis.call('HGETALL', ids)
  for i = 2, #all, 2 do
    local v = all[i]
    if string.sub(v, 1, #prefix) == prefix then
      entries[#entries + 1] = string.sub(v, #prefix + 1)
    end
  end
  for i, id in ipairs(entries) do
    if outcome == 'dead' then
      local fields = {'entry', id, 'code', ARGV[7], 'window', member, 'segment', seg}
      local found = redis.call('XRANGE', stream, id, id)
      if #found > 0 then
        for _, f in ipairs(found[1][2]) do fields[#fields + 1] = f end
      end
      redis.call('XADD', dead, '*', unpack(fields))
    end
  end
  -- XACK in chunks: unpack() is bounded by Lua's C stack
  for i = 1, #entries, 1000 do
    acked = acked + redis.call('XACK', stream, group,
      unpack(entries, i, math.min(i + 999, #entries)))
  end
end

local cur = tonumber(redis.call('HGET', win, 'cur') or '0')
local done = tonumber(redis.call('HGET', win, 'n:' .. cur) or '0') == 0
for i = 0, cur - 1 do
  if done and redis.call('HGET', win, 's:' .. i) == 'sealed' then
    done = false
  end
end
if done then
  redis.call('ZREM', open, member)
  redis.call('EXPIRE', ids, ARGV[8])
  redis.call('EXPIRE', win, ARGV[9])
end
if (done or ARGV[10] == '1') and redis.call('GET', lock) == token then
  redis.call('DEL', lock)
end
return acked
