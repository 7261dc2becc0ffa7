-- Ship one batch of spooled usage records into the stream, and advance the spool file's
-- shipped offset in the same atomic step (billing/spool_shipper.py, SpoolShipper).
--
-- KEYS[1]       the usage stream
-- KEYS[2]       the spool file's shipped offset (billing.keys.spool_offset); missing = 0
-- ARGV[1]       the offset the shipper believes the key holds (where the batch applies)
-- ARGV[2]       the offset just past the batch's last frame
-- ARGV[3]       the offset key's TTL in seconds (refreshed by every batch)
-- ARGV[4..]     the msgpack records, in spool order (none for a batch of damaged frames)
--
-- A compare-and-set: the batch lands only if the key still holds ARGV[1]. Then every record
-- is added and the key is set to ARGV[2]; returns {1, ARGV[2]}. Otherwise (the batch, or part
-- of it, was shipped already: a crash before the local offset was saved, another shipper)
-- nothing is written and it returns {0, current offset}.
--
-- No partial batch: when Redis is out of memory only a script's first write is refused, and
-- the XADDs come before the SET, so a batch is added whole with its offset, or not at all.
local raw = redis.call('GET', KEYS[2])
local current = 0
if raw then
  current = tonumber(raw)
  if current == nil then
    return redis.error_reply('usage spool offset ' .. KEYS[2] .. ' is not a number')
  end
end
if current ~= tonumber(ARGV[1]) then
  return {0, current}
end
for i = 4, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'r', ARGV[i])
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return {1, tonumber(ARGV[2])}
