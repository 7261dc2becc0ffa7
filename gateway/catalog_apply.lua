-- Store a new catalog version atomically (gateway/catalog_store.py, CatalogStore.apply).
--
-- KEYS[1]  catalog version counter        KEYS[2]  current document
-- KEYS[3]  history copy of the new version KEYS[4]  (optional) history copy to expire
-- ARGV[1]  the version the writer read (compare-and-set; a missing counter reads as 0)
-- ARGV[2]  msgpack document, already carrying version ARGV[1] + 1
-- ARGV[3]  events channel                  ARGV[4]  event message ("catalog:<version>")
--
-- Returns {1, new_version} when stored, {0, current_version} when another write got there first.
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current}
end
local new = current + 1
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('SET', KEYS[1], new)
if KEYS[4] then
  redis.call('DEL', KEYS[4])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, new}
