-- Which consumers other than the caller have a place in these runtime queues' holder group,
-- and how much each has pending: the first step of reclaiming what dead holders left behind
-- (gateway/tunnel/reclaim.py), for a whole batch of queues in one call. In the common case
-- (the caller is the only consumer) the answer is empty: no per-queue reply to parse.
--
-- KEYS[i] runtime_queue (i = 1 .. n)
-- ARGV[1] consumer group     ARGV[2] the caller's consumer name (its process id)
-- Returns a flat list: queue index (0-based), consumer name, pending count, ... A queue or
-- group that does not exist is skipped.
local out = {}
for i = 1, #KEYS do
  local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[i], ARGV[1])
  if type(consumers) == 'table' and not consumers.err then
    for _, c in ipairs(consumers) do
      local name, pending
      for j = 1, #c, 2 do
        if c[j] == 'name' then
          name = c[j + 1]
        elseif c[j] == 'pending' then
          pending = c[j + 1]
        end
      end
      if name ~= ARGV[2] then
        out[#out + 1] = i - 1
        out[#out + 1] = name
        out[#out + 1] = pending
      end
    end
  end
end
return out
