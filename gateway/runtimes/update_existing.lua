-- Set and delete fields of a hash only if it exists: never resurrect a consumed device grant
-- or create a runtime record from a stray update (gateway/runtimes/store.py, device_grants.py).
--
-- KEYS[1]  the hash
-- ARGV[1]  n, the number of field/value pairs that follow
-- ARGV[2 .. 1+2n]  field, value, field, value, ...
-- ARGV[2+2n ..]    fields to delete
--
-- Returns 1 if the hash existed (and was updated), else 0.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local n = tonumber(ARGV[1])
if n > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2, 1 + 2 * n))
end
if #ARGV > 1 + 2 * n then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 2 + 2 * n))
end
return 1
