-- ha-election's lease script: every lease operation is one EVALSHA of this script, so each one
-- is atomic on the server and costs one round trip.
--
-- KEYS[1]: the lease record, a string `<token>\n<holder>` with a PX expiry (the store's clock).
-- KEYS[2]: the key's last token, a decimal string WITHOUT expiry.
-- ARGV[1]: the operation; the other arguments depend on it.
--
-- Lua numbers are doubles: integers are exact below 2^53, and tokens (microseconds since the
-- epoch, or a little above) stay below that until the year 2255. They travel as decimal strings
-- formatted with '%.0f', never tostring(), which would print 1.7e+15.
local op = ARGV[1]

if op == 'acquire' then
  -- ARGV[2]: holder, ARGV[3]: ttl in ms, ARGV[4]: change channel, ARGV[5]: change payload.
  local record = redis.call('GET', KEYS[1])
  if record then
    return {0, record, redis.call('PTTL', KEYS[1])}
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
  redis.call('SET', KEYS[2], text)
  redis.call('SET', KEYS[1], text .. '\n' .. ARGV[2], 'PX', ARGV[3])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return {1, text}
elseif op == 'renew' then
  -- ARGV[2]: the expected record `<token>\n<holder>`, ARGV[3]: ttl in ms.
  if redis.call('GET', KEYS[1]) == ARGV[2] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return 1
  end
  return 0
elseif op == 'release' then
  -- ARGV[2]: the expected record, ARGV[3]: change channel, ARGV[4]: change payload.
  if redis.call('GET', KEYS[1]) == ARGV[2] then
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[3], ARGV[4])
    return 1
  end
  return 0
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
