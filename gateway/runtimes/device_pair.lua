-- Issue the credential of a runtime approved through the device flow, consuming the grant
-- (gateway/runtimes/store.py, pair_device). RFC 8628 §3.5: the device code is single-use.
--
-- KEYS[1]  the device grant's hash      KEYS[2]  the runtime's hash
-- ARGV[1]  runtime id                   ARGV[2]  now (ms)
-- ARGV[3]  sha256 of the new credential's secret
--
-- Returns 1 when issued (grant deleted, credential stored, paired_ms set), else 0: the grant
-- was consumed by a concurrent poll, or names another runtime, or the runtime is revoked or
-- already has a credential.
local g = redis.call('HMGET', KEYS[1], 'status', 'runtime_id')
if g[1] ~= 'approved' or g[2] ~= ARGV[1] then
  return 0
end
local r = redis.call('HMGET', KEYS[2], 'id', 'revoked_ms', 'cred_sha256')
if r[1] ~= ARGV[1] or r[2] or r[3] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'cred_sha256', ARGV[3], 'paired_ms', ARGV[2])
return 1
