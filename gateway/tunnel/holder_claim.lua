-- Take the presence of a runtime for this gateway process (the newest tunnel wins) and make
-- sure the runtime's dispatch queue has the holders' consumer group BEFORE anyone can see the
-- holder: a dispatcher only enqueues while a holder exists, so no entry predates the group.
-- The group starts at id 0 so entries already in the stream (a dead holder's) are delivered.
--
-- KEYS[1] runtime_holder     KEYS[2] runtime_queue
-- ARGV[1] process id         ARGV[2] presence TTL (ms)
-- ARGV[3] group name         ARGV[4] queue TTL (ms)
local has_group = false
if redis.call('EXISTS', KEYS[2]) == 1 then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
    -- each group is a flat array: name, <name>, consumers, <n>, ...
    if group[2] == ARGV[3] then has_group = true end
  end
end
if not has_group then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[3], '0', 'MKSTREAM')
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
