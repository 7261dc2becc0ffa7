-- Record a provider's pending payout as paid (billing/payouts.py, PayoutService).
--
-- KEYS[1]   the provider's payout state (billing.keys.payout_state)
-- KEYS[2]   the provider's payout log (billing.keys.payout_log)
-- ARGV[1]   the pending attempt's number (`pending_seq`)
-- ARGV[2]   the amount Stripe transferred, in cents
-- ARGV[3]   the log entry (JSON PayoutRecord)
--
-- Only if that attempt still is the pending one (a concurrent run may have recorded it):
-- adds the amount to `paid_cents`, counts the payout, clears the pending attempt and appends
-- the log entry, all at once. Returns 1, or 0 when there was nothing to record.
if redis.call('HGET', KEYS[1], 'pending_seq') ~= ARGV[1] then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'paid_cents', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'payouts', 1)
redis.call('HDEL', KEYS[1], 'pending_seq', 'pending_cents', 'pending_dest', 'pending_at')
redis.call('RPUSH', KEYS[2], ARGV[3])
return 1
