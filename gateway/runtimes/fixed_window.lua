-- Count one event in a fixed window (gateway/runtimes/ratelimit.py, FixedWindow.hit).
--
-- KEYS[1]  the counter                  ARGV[1]  window length (ms)
--
-- Returns {count in the current window, ms until the window ends}. The first hit of a window
-- sets its expiry; a counter that somehow lost its expiry gets one back.
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
