-- Accrue one batch of usage records into the serving parties' earnings ledgers, and
-- acknowledge them in the same atomic step (billing/earnings.py, EarningsConsumer).
--
-- KEYS[1]        the usage stream
-- KEYS[2]        the set of serving parties (billing.keys.EARNINGS_PARTIES)
-- KEYS[1+2i]     record i's dispatch marker (billing.keys.earnings_seen), i = 1..n
-- KEYS[2+2i]     record i's serving party ledger (billing.keys.earnings_ledger)
-- ARGV[1]        the consumer group
-- ARGV[2]        the dispatch markers' TTL in seconds
-- ARGV[4i-1..4i+2]  record i: stream entry id, serving party, UTC day, pico-USD earned
--
-- A record is accrued only if this script's XACK removes it from the group's pending list:
-- acknowledging and accruing are one step, so an entry delivered twice (a consumer that died
-- after reading it, its entry reclaimed by another) is counted by whichever script runs
-- first, and acknowledged-but-not-accrued cannot happen. A second *entry* of a dispatch
-- already accrued (within the marker's TTL) is acknowledged and not counted.
--
-- Amounts stay strings: HINCRBY adds them as 64-bit integers (Lua numbers are doubles, and
-- would print large ones in exponent form). Returns {accrued, duplicates, already acked}.
local accrued, duplicates, stale = 0, 0, 0
local n = (#KEYS - 2) / 2
for i = 1, n do
  local a = 4 * i - 1
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[a]) == 1 then
    if redis.call('SET', KEYS[1 + 2 * i], '1', 'NX', 'EX', ARGV[2]) then
      local ledger = KEYS[2 + 2 * i]
      redis.call('HINCRBY', ledger, 'pico:' .. ARGV[a + 2], ARGV[a + 3])
      redis.call('HINCRBY', ledger, 'n:' .. ARGV[a + 2], 1)
      redis.call('SADD', KEYS[2], ARGV[a + 1])
      accrued = accrued + 1
    else
      duplicates = duplicates + 1
    end
  else
    stale = stale + 1
  end
end
return {accrued, duplicates, stale}
