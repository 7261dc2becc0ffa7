-- Approve or deny a pending device authorization by its user code
-- (gateway/runtimes/device_grants.py, DeviceGrantStore.decide). The user code is claimed
-- (deleted) in the same step, so of two concurrent decisions exactly one wins.
--
-- KEYS[1]  user code -> device key      KEYS[2]  the device grant's hash
-- ARGV[1]  device key the caller read   ARGV[2]  now (ms)
-- ARGV[3]  'approved' | 'denied'        ARGV[4]  runtime id ('' when denied)
-- ARGV[5]  workspace ('' when denied)
--
-- Returns 1 when decided, 0 when the code no longer maps to that grant, or the grant is not
-- pending, or it has expired.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local g = redis.call('HMGET', KEYS[2], 'status', 'expires_ms')
if g[1] ~= 'pending' or tonumber(g[2] or '0') <= tonumber(ARGV[2]) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'status', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[2], 'runtime_id', ARGV[4], 'workspace', ARGV[5])
end
return 1
