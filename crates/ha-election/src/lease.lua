-- ha-election's lease script: every lease operation is one EVALSHA of this script, so each one
-- is atomic on the server and costs one round trip.
--
-- KEYS[1]: the lease record, a string `<token> <renewals> <ttl ms>[ released]\n<holder>` with a
--          PX of twice the ttl: the store keeps a lapsed record for a while so that followers
--          that watched it can take it over by compare-and-set (they judge expiry on their own
--          clocks; Redis's clock only bounds how long an abandoned record lingers). Records of
--          the older form `<token>\n<holder>` read as 0 renewals.
-- KEYS[2]: the key's last token, a decimal string WITHOUT expiry.
-- ARGV[1]: the operation; the other arguments depend on it.
--
-- Lua numbers are doubles: integers are exact below 2^53, and tokens (microseconds since the
-- epoch, or a little above) stay below that until the year 2255. They travel as decimal strings
-- formatted with '%.0f', never tostring(), which would print 1.7e+15.

-- A record's fields, or nil if it is not a record this script wrote.
local function parse(record)
  local nl = string.find(record, '\n', 1, true)
  if not nl then
    return nil
  end
  local fields = {}
  for field in string.gmatch(string.sub(record, 1, nl - 1), '%S+') do
    table.insert(fields, field)
  end
  if fields[1] == nil then
    return nil
  end
  return {
    token = fields[1],
    renewals = fields[2] or '0',
    ttl = fields[3] or '0',
    released = fields[4] == 'released',
    holder = string.sub(record, nl + 1),
  }
end

-- The record as a client spells the one it expects: `<token> <renewals>[ released]\n<holder>`.
local function canonical(r)
  local released = ''
  if r.released then
    released = ' released'
  end
  return r.token .. ' ' .. r.renewals .. released .. '\n' .. r.holder
end

local function format(token, renewals, ttl, released, holder)
  local flag = ''
  if released then
    flag = ' released'
  end
  return token .. ' ' .. renewals .. ' ' .. ttl .. flag .. '\n' .. holder
end

-- Held by exactly (holder, token) in a term that was not released.
local function held_by(record, holder, token)
  if not record then
    return nil
  end
  local r = parse(record)
  if r == nil or r.released or r.holder ~= holder or r.token ~= token then
    return nil
  end
  return r
end

local op = ARGV[1]

if op == 'acquire' then
  -- ARGV[2]: holder, ARGV[3]: ttl in ms, ARGV[4]: change channel, ARGV[5]: change payload,
  -- ARGV[6]: the record the caller observed (canonical form), or '' for "no record".
  -- Granted only if the record is exactly the expected one (or absent when none is expected);
  -- the record's expiry is not consulted.
  local record = redis.call('GET', KEYS[1])
  local expected = ARGV[6]
  if record then
    local r = parse(record)
    if expected == '' or r == nil or canonical(r) ~= expected then
      return {0, record, redis.call('PTTL', KEYS[1])}
    end
  elseif expected ~= '' then
    return {2}
  end
  local last = redis.call('GET', KEYS[2])
  local last_token = 0
  if last then
    last_token = tonumber(last)
    if last_token == nil then
      return redis.error_reply('CORRUPT token counter ' .. KEYS[2] .. ' holds ' .. last)
    end
  end
  -- The floor: the server's time in microseconds. If the counter was lost (a restart without
  -- persistence, a failover that lost the last write), the floor still lies above every token
  -- handed out before, as long as tokens never ran ahead of the clock by more than the outage.
  local now = redis.call('TIME')
  local floor = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local token = last_token + 1
  if floor > token then
    token = floor
  end
  local text = string.format('%.0f', token)
  local keep = string.format('%.0f', tonumber(ARGV[3]) * 2)
  redis.call('SET', KEYS[2], text)
  redis.call('SET', KEYS[1], format(text, '0', ARGV[3], false, ARGV[2]), 'PX', keep)
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return {1, text}
elseif op == 'renew' then
  -- ARGV[2]: holder, ARGV[3]: token, ARGV[4]: ttl in ms. Counts the renewal in the record;
  -- never shortens the record's life (an older renewal applied late cannot pull it in).
  local r = held_by(redis.call('GET', KEYS[1]), ARGV[2], ARGV[3])
  if r == nil then
    return 0
  end
  local keep = tonumber(ARGV[4]) * 2
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl > keep then
    keep = pttl
  end
  local renewals = string.format('%.0f', tonumber(r.renewals) + 1)
  redis.call('SET', KEYS[1], format(r.token, renewals, ARGV[4], false, r.holder), 'PX', string.format('%.0f', keep))
  return 1
elseif op == 'release' then
  -- ARGV[2]: holder, ARGV[3]: token, ARGV[4]: change channel, ARGV[5]: change payload.
  -- Leaves a tombstone with the record's remaining life.
  local r = held_by(redis.call('GET', KEYS[1]), ARGV[2], ARGV[3])
  if r == nil then
    return 0
  end
  redis.call('SET', KEYS[1], format(r.token, r.renewals, r.ttl, true, r.holder), 'KEEPTTL')
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 1
elseif op == 'read' then
  local record = redis.call('GET', KEYS[1])
  if record then
    return {record, redis.call('PTTL', KEYS[1])}
  end
  return false
elseif op == 'heartbeat' then
  -- Membership. KEYS[1]: a sorted set of members scored by expiry (server ms); KEYS[2]: a hash
  -- of each member's meta. ARGV[2]: node, ARGV[3]: ttl in ms, ARGV[4]: meta (opaque string).
  -- Dead members are removed here, so both keys stay bounded by the live group; both expire
  -- after the longest ttl seen, so an abandoned group leaves nothing behind.
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms)
  for _, node in ipairs(dead) do
    redis.call('HDEL', KEYS[2], node)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
  local ttl = tonumber(ARGV[3])
  redis.call('ZADD', KEYS[1], string.format('%.0f', now_ms + ttl), ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
  for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < ttl then
      redis.call('PEXPIRE', key, ttl)
    end
  end
  return 1
elseif op == 'members' then
  -- Live members as a flat array {node, meta, remaining ms, ...}, sorted by node.
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.0f', now_ms), '+inf', 'WITHSCORES')
  local rows = {}
  for i = 1, #live, 2 do
    table.insert(rows, {live[i], tonumber(live[i + 1]) - now_ms})
  end
  table.sort(rows, function(a, b) return a[1] < b[1] end)
  local out = {}
  for _, row in ipairs(rows) do
    table.insert(out, row[1])
    table.insert(out, redis.call('HGET', KEYS[2], row[1]) or '')
    table.insert(out, row[2])
  end
  return out
end
return redis.error_reply('ERR ha-election lease script: unknown operation ' .. tostring(op))
