-- Redeem a runtime's one-time bootstrap token (gateway/runtimes/store.py, redeem_bootstrap).
--
-- KEYS[1]  the runtime's hash
-- ARGV[1]  sha256 of the presented secret, already compared in constant time by the caller;
--          compared again here as a compare-and-set, so that exactly one of any number of
--          concurrent redeems wins
-- ARGV[2]  now (ms)                 ARGV[3]  sha256 of the new runtime credential's secret
--
-- Returns 1 when redeemed (bootstrap fields deleted, credential stored, paired_ms set), else 0:
-- already redeemed, expired, revoked, or already paired.
local h = redis.call('HMGET', KEYS[1], 'boot_sha256', 'boot_expires_ms', 'revoked_ms', 'cred_sha256')
if h[1] ~= ARGV[1] or h[3] or h[4] then
  return 0
end
if tonumber(h[2] or '0') <= tonumber(ARGV[2]) then
  return 0
end
redis.call('HDEL', KEYS[1], 'boot_sha256', 'boot_expires_ms')
redis.call('HSET', KEYS[1], 'cred_sha256', ARGV[3], 'paired_ms', ARGV[2])
return 1
