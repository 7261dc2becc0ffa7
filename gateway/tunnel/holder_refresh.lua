-- Keep this process's presence alive for a batch of runtimes in one call, except where a newer
-- tunnel on another process took a runtime over (0 in the answer: the caller closes its
-- superseded tunnel). One call per batch, not per runtime: at thousands of idle tunnels the
-- client's cost per command is what the refresh costs.
--
-- KEYS[2i-1] runtime_holder     KEYS[2i] runtime_queue     (i = 1 .. #KEYS / 2)
-- ARGV[1] process id            ARGV[2] presence TTL (ms)  ARGV[3] queue TTL (ms)
-- Returns a list of 1 (refreshed) or 0 (superseded), in the order of the runtimes.
local kept = {}
for i = 1, #KEYS, 2 do
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= ARGV[1] then
    kept[#kept + 1] = 0
  else
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    redis.call('PEXPIRE', KEYS[i + 1], ARGV[3])
    kept[#kept + 1] = 1
  end
end
return kept
