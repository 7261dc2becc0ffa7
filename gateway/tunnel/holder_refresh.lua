-- Keep this process's presence for one runtime alive, unless a newer tunnel on another
-- process took it over (then return 0: the caller closes its superseded tunnel).
--
-- KEYS[1] runtime_holder     KEYS[2] runtime_queue
-- ARGV[1] process id         ARGV[2] presence TTL (ms)     ARGV[3] queue TTL (ms)
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
