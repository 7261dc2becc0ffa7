-- Publish (or refresh) one dispatch-signing public key (gateway/tunnel/tokens.py,
-- DispatchSigner.refresh). Expiry is reckoned on the Redis server's clock, so gateway
-- processes on hosts whose clocks disagree still agree on which keys are live.
--
-- KEYS[1]  sorted set of live public JWKs (gateway.keys.DISPATCH_JWKS)
-- ARGV[1]  the public JWK (JSON)
-- ARGV[2]  how long it stays live from now, in milliseconds
--
-- Returns the member's expiry (server milliseconds).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
-- The set itself outlives its longest-lived member, and vanishes once every publisher is gone.
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return now + ttl
