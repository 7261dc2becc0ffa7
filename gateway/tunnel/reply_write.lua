-- The holder's writes for one relayed dispatch, in one call (one command instead of a
-- pipeline of four: the client's cost per command is what a round trip costs here).
-- Appends a batch of events to the reply stream and keeps it alive for ARGV[2] ms; with a
-- queue entry (KEYS[2], the last write of the dispatch) also acknowledges and deletes the
-- entry in the runtime's queue. An empty batch (a cancelled dispatch) writes nothing.
--
-- KEYS[1] dispatch_reply     KEYS[2] runtime_queue (optional)
-- ARGV[1] events (msgpack, or empty)     ARGV[2] reply TTL in ms
-- ARGV[3] consumer group (with KEYS[2])     ARGV[4] queue entry id (with KEYS[2])
if ARGV[1] ~= '' then
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if KEYS[2] then
  redis.call('XACK', KEYS[2], ARGV[3], ARGV[4])
  redis.call('XDEL', KEYS[2], ARGV[4])
end
return 1
