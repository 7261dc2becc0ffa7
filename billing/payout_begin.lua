-- Begin a provider's next payout attempt (billing/payouts.py, PayoutService).
--
-- KEYS[1]   the provider's payout state (billing.keys.payout_state)
-- ARGV[1]   the attempt count the caller read (field `seq`; missing = 0)
-- ARGV[2]   the amount in cents
-- ARGV[3]   the destination (acct_...)
-- ARGV[4]   the time, unix seconds
--
-- A compare-and-set: only when no attempt is pending and `seq` still is ARGV[1], the attempt
-- ARGV[1] + 1 is recorded as pending with its amount and destination, *before* the transfer
-- is sent, so a crash after Stripe accepted it finds the attempt to heal with the same
-- idempotency key and the same parameters. Returns 1, or 0 when another run got there first.
if redis.call('HEXISTS', KEYS[1], 'pending_seq') == 1 then
  return 0
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if seq ~= tonumber(ARGV[1]) then
  return 0
end
local next_seq = string.format('%d', seq + 1)
redis.call('HSET', KEYS[1], 'seq', next_seq, 'pending_seq', next_seq, 'pending_cents', ARGV[2],
  'pending_dest', ARGV[3], 'pending_at', ARGV[4])
return 1
