-- Drop a provider's pending payout attempt that Stripe refused for good, so that no transfer
-- exists for it (billing/payouts.py, PayoutService). The attempt's number stays used: the
-- next attempt gets a new idempotency key (Stripe replays a key's stored error for 24 h).
--
-- KEYS[1]   the provider's payout state (billing.keys.payout_state)
-- ARGV[1]   the pending attempt's number
--
-- Returns 1, or 0 when that attempt is no longer pending.
if redis.call('HGET', KEYS[1], 'pending_seq') ~= ARGV[1] then
  return 0
end
redis.call('HDEL', KEYS[1], 'pending_seq', 'pending_cents', 'pending_dest', 'pending_at')
return 1
