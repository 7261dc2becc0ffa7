-- Ship a batch of spooled usage records into the stream, each at most once
-- (billing/spool.py, SpoolOutbox).
--
-- KEYS[1]       the usage stream
-- KEYS[2..n+1]  the "seen" marker of each record's dispatch (billing.keys.usage_seen)
-- ARGV[1]       the markers' TTL in seconds
-- ARGV[2..n+1]  the msgpack records, in spool order
--
-- A record whose marker already exists was added by an earlier shipment of the same bytes
-- (the shipper crashed before it saved its offset) and is skipped. Returns how many were added.
local added = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    local ok = redis.pcall('XADD', KEYS[1], '*', 'r', ARGV[i])
    if type(ok) == 'table' and ok.err then
      -- never leave a marker for a record that is not in the stream: it would be lost
      redis.call('DEL', KEYS[i])
      return redis.error_reply(ok.err)
    end
    added = added + 1
  end
end
return added
