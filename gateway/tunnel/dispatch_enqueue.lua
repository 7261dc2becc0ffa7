-- Enqueue one dispatch for the process holding the runtime's tunnel, in one round trip:
-- nothing is enqueued when no process holds it (the caller answers 503 at once) or when the
-- holder is the caller itself (its own tunnel is closing: enqueuing would only loop back).
-- In those two cases the reply stream gets a marker entry instead, which ends the read the
-- caller started on it concurrently with this script. Returns the holder's id, or nil.
--
-- KEYS[1] runtime_holder     KEYS[2] runtime_queue     KEYS[3] dispatch_reply
-- ARGV[1] caller's process id     ARGV[2] approximate queue cap     ARGV[3] entry (msgpack)
-- ARGV[4] marker events (msgpack)
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] then
  redis.call('XADD', KEYS[3], '*', 'e', ARGV[4])
  redis.call('PEXPIRE', KEYS[3], 10000)
  return holder
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[3])
return holder
