-- Compare-and-delete: drop a runtime's presence only while it still names this process (a
-- newer tunnel on another process may already hold it).
--
-- KEYS[1] runtime_holder     ARGV[1] process id
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
