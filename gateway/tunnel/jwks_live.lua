-- The dispatch-signing public keys that are still live (gateway/tunnel/tokens.py,
-- DispatchSigner.jwks), on the Redis server's clock (see jwk_publish.lua).
--
-- KEYS[1]  sorted set of live public JWKs (gateway.keys.DISPATCH_JWKS)
--
-- Returns the live members (public JWKs as JSON), soonest-expiring first.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
