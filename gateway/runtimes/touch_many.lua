-- Record a sign of life for a batch of runtimes in one call: set one field of each runtime
-- hash that exists (never create a record from a stray id; cf. update_existing.lua).
--
-- KEYS[i] runtime hash     ARGV[1] field     ARGV[2] value
-- Returns how many records were updated.
local n = 0
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HSET', KEYS[i], ARGV[1], ARGV[2])
    n = n + 1
  end
end
return n
