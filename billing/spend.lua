-- A workspace's monthly spend limit and prepaid credit, changed atomically
-- (billing/spend.py, SpendGuard). The functions above the dispatcher are also the start of
-- the usage ledger's script (billing/usage_ledger.lua is appended to this file), so a
-- gateway's settlement and the ledger's change the same state the same way.
--
-- KEYS (every op)  1 account hash (limit, credit_on, credit, reserved)
--                  2 reservations hash (id -> estimate)   3 reservation deadlines zset
--                  4 early-settled dispatch ids zset      5 the month's spent counter
--                  6 credit grants hash (grant id -> micro-USD)
-- ARGV[1]          op: admit | settle | release | credit | state
-- ARGV[2]          now, ms (reservations past their deadline are dropped first)
-- ARGV[3..]        the op's arguments (below)
--
-- Money: integer strings, micro-USD for the limit and grants, pico-USD for everything else.
-- Stored amounts only change through INCRBY/HINCRBY on integer strings (exact in 64 bits);
-- Lua numbers (doubles) are used only to compare, where an error of a few pico-USD above
-- 2^53 pico-USD (~$9,000) cannot matter.

local function negate(n)
  if n == '0' then return '0' end
  if string.sub(n, 1, 1) == '-' then return string.sub(n, 2) end
  return '-' .. n
end

-- Drop one reservation; false when there is none.
local function drop_reservation(account, reservations, deadlines, id)
  local estimate = redis.call('HGET', reservations, id)
  if not estimate then return false end
  redis.call('HDEL', reservations, id)
  redis.call('ZREM', deadlines, id)
  if estimate ~= '0' then redis.call('HINCRBY', account, 'reserved', negate(estimate)) end
  return true
end

-- Drop reservations past their deadline (a crashed process's) and stale early markers.
local function sweep(account, reservations, deadlines, settled, now)
  local due = redis.call('ZRANGEBYSCORE', deadlines, '-inf', now, 'LIMIT', 0, 128)
  for i = 1, #due do
    if not drop_reservation(account, reservations, deadlines, due[i]) then
      redis.call('ZREM', deadlines, due[i])
    end
  end
  redis.call('ZREMRANGEBYSCORE', settled, '-inf', now)
end

-- Count a cost: the month's spent, and the credit balance when credit is on.
local function charge(account, month, amount, month_ttl)
  redis.call('INCRBY', month, amount)
  redis.call('EXPIRE', month, month_ttl)
  if amount ~= '0' and redis.call('HEXISTS', account, 'credit_on') == 1 then
    redis.call('HINCRBY', account, 'credit', negate(amount))
  end
end

-- The usage ledger's settlement of one record (exactly once per dispatch: the ledger
-- dedupes). A dispatch its gateway settled already only loses its marker; otherwise the
-- cost is counted and the reservation (id = dispatch id), if still open, dropped.
local function settle_final(account, reservations, deadlines, settled, month, dispatch_id,
                            cost, month_ttl)
  if redis.call('ZREM', settled, dispatch_id) == 1 then return 0 end
  drop_reservation(account, reservations, deadlines, dispatch_id)
  charge(account, month, cost, month_ttl)
  return 1
end

local OP = ARGV[1]
local NOW = ARGV[2]

if OP == 'admit' then
  -- ARGV[3] reservation id, [4] estimate (pico-USD), [5] deadline (ms).
  -- Returns {0}: no limit and no credit (nothing reserved); {1}: reserved (or already
  -- was); {-1, reason}: refused, reason 'monthly_limit' or 'credit'.
  local cfg = redis.call('HMGET', KEYS[1], 'limit', 'credit_on')
  if not cfg[1] and not cfg[2] then return {0} end
  sweep(KEYS[1], KEYS[2], KEYS[3], KEYS[4], NOW)
  if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then return {1} end
  local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
  local estimate = tonumber(ARGV[4])
  if cfg[1] then
    local spent = tonumber(redis.call('GET', KEYS[5]) or '0')
    if spent + reserved + estimate > tonumber(cfg[1]) * 1000000 then
      return {-1, 'monthly_limit'}
    end
  end
  if cfg[2] then
    -- Credit must remain after the open reservations, and cover the estimate.
    local left = tonumber(redis.call('HGET', KEYS[1], 'credit') or '0') - reserved
    if left <= 0 or left < estimate then return {-1, 'credit'} end
  end
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3])
  if ARGV[4] ~= '0' then redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[4]) end
  return {1}
elseif OP == 'settle' then
  -- A gateway's settlement. ARGV[3] reservation id, [4] actual cost (pico-USD),
  -- [5] dispatch id, [6] when the early marker may be dropped (ms), [7] month TTL (s).
  -- Only an open reservation is settled (1); otherwise 0 and nothing changes: settled
  -- already, released, expired, or never reserved (the usage ledger counts those).
  if not drop_reservation(KEYS[1], KEYS[2], KEYS[3], ARGV[3]) then return 0 end
  charge(KEYS[1], KEYS[5], ARGV[4], ARGV[7])
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5])
  return 1
elseif OP == 'release' then
  -- ARGV[3] reservation id. 1 if it was open.
  if drop_reservation(KEYS[1], KEYS[2], KEYS[3], ARGV[3]) then return 1 end
  return 0
elseif OP == 'credit' then
  -- ARGV[3] grant id, [4] amount (micro-USD), [5] the same in pico-USD.
  -- {1}: added; {0}: this grant was added before; {-1, amount}: the grant id was used
  -- with another amount.
  local prior = redis.call('HGET', KEYS[6], ARGV[3])
  if prior then
    if prior == ARGV[4] then return {0} end
    return {-1, prior}
  end
  redis.call('HSET', KEYS[6], ARGV[3], ARGV[4])
  redis.call('HSET', KEYS[1], 'credit_on', '1')
  redis.call('HINCRBY', KEYS[1], 'credit', ARGV[5])
  return {1}
elseif OP == 'state' then
  -- {limit or false, spent, reserved, credit_on or false, credit}
  sweep(KEYS[1], KEYS[2], KEYS[3], KEYS[4], NOW)
  local cfg = redis.call('HMGET', KEYS[1], 'limit', 'reserved', 'credit_on', 'credit')
  return {cfg[1], redis.call('GET', KEYS[5]) or '0', cfg[2] or '0', cfg[3], cfg[4] or '0'}
elseif OP ~= 'ledger' then
  return redis.error_reply('spend.lua: unknown op ' .. tostring(OP))
end
