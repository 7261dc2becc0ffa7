-- Claim a due window for sending and seal its collecting segment (billing/ledger.py,
-- Ledger.claim).
--
-- KEYS[1] the window's ledger hash   KEYS[2] the window's lock   KEYS[3] open windows (zset)
-- ARGV[1] the caller's lock token    ARGV[2] lock lifetime (ms) ARGV[3] the window's member
--
-- The lock (SET NX PX, or extended when the caller already holds it) makes one worker at a
-- time send a window; the deterministic meter-event identifiers make a second sender (after
-- the lock expired under a slow first one) harmless anyway. Sealing freezes the collecting
-- segment `cur` if it holds records, and opens `cur + 1` for records folded from now on, so
-- what is sent is never added to while in flight.
-- Returns nil when another worker holds the lock; otherwise the window's hash (HGETALL) after
-- sealing. A window with nothing left to send is removed from the open set and unlocked (its
-- hash is returned all the same, with no sealed segment).
local win, lock, open = KEYS[1], KEYS[2], KEYS[3]
local holder = redis.call('GET', lock)
if holder and holder ~= ARGV[1] then
  return nil
end
local cur = tonumber(redis.call('HGET', win, 'cur') or '0')
local n = tonumber(redis.call('HGET', win, 'n:' .. cur) or '0')
if n > 0 and not redis.call('HGET', win, 's:' .. cur) then
  redis.call('HSET', win, 's:' .. cur, 'sealed', 'cur', cur + 1)
  cur = cur + 1
end
local pending = false
for i = 0, cur - 1 do
  if redis.call('HGET', win, 's:' .. i) == 'sealed' then
    pending = true
    break
  end
end
if pending then
  redis.call('SET', lock, ARGV[1], 'PX', ARGV[2])
else
  redis.call('ZREM', open, ARGV[3])
  if holder then
    redis.call('DEL', lock)
  end
end
return redis.call('HGETALL', win)
