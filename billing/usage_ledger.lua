-- The usage ledger's batch (billing/usage_ledger.py, UsageLedger): count a batch of usage
-- records into per-workspace daily aggregates, settle each one's spend, and acknowledge the
-- batch's stream entries, in one atomic step. This file is appended to billing/spend.lua,
-- whose functions (settle_final, ...) it uses.
--
-- KEYS[1]   the usage stream; KEYS[2..] the keys the batch names by index
-- ARGV[1]   'ledger' (spend.lua's dispatcher lets it through)
-- ARGV[2]   now, ms (unused)
-- ARGV[3]   the consumer group
-- ARGV[4]   the batch, JSON:
--   ack:       every stream entry id of the batch (undecodable ones included)
--   records:   one per record to count: {ids, account, reservations, deadlines, settled,
--              month, dispatch_id, cost}, the first six key indexes
--   incr:      the records' aggregates, summed: {key index, field, delta, ...}
--   expire:    {key index, ttl (s)} for every key the batch writes
--   month_ttl: the month spent counter's TTL (s)
-- Amounts (cost, deltas) are integer strings: exact whatever their size.
--
-- A record counts once per dispatch id (its day's id set). If any record of the batch was
-- counted before (an entry applied by a consumer while another had reclaimed it; a
-- dispatch that reached the stream twice), nothing is written and the script answers
-- {0, dispatch ids counted before}: the caller drops those records (keeping their entries
-- in `ack`) and sends the batch again, with the sums of the others. Otherwise every record
-- is settled (spend.lua, settle_final), the sums added, the entries acknowledged, and the
-- answer is {1, records counted}.
--
-- The checks come before any write: when Redis is out of memory only a script's first
-- write is refused, so a batch is applied whole or not at all.
if OP ~= 'ledger' then return redis.error_reply('usage_ledger.lua: not a ledger call') end

local batch = cjson.decode(ARGV[4])
local seen = {}
for _, r in ipairs(batch.records) do
  if redis.call('SISMEMBER', KEYS[r[1]], r[7]) == 1 then seen[#seen + 1] = r[7] end
end
if #seen > 0 then return {0, seen} end

for _, r in ipairs(batch.records) do
  redis.call('SADD', KEYS[r[1]], r[7])
  settle_final(KEYS[r[2]], KEYS[r[3]], KEYS[r[4]], KEYS[r[5]], KEYS[r[6]], r[7], r[8],
               batch.month_ttl)
end
local incr = batch.incr
for i = 1, #incr, 3 do
  redis.call('HINCRBY', KEYS[incr[i]], incr[i + 1], incr[i + 2])
end
for _, e in ipairs(batch.expire) do
  redis.call('EXPIRE', KEYS[e[1]], e[2])
end
if #batch.ack > 0 then
  redis.call('XACK', KEYS[1], ARGV[3], unpack(batch.ack))
end
return {1, #batch.records}
