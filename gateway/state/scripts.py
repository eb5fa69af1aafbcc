"""The Lua scripts of the Redis state (redis_state.py): each runs atomically in Redis, on Redis's own clock, so
replicas on hosts whose clocks differ still count one window."""

NOW = """
local clock = redis.call('TIME')
local second = tonumber(clock[1])
local now = second * 1000 + math.floor(tonumber(clock[2]) / 1000)  -- milliseconds
"""

# A key's windows: KEYS = its requests and its tokens (hashes: the second of a use -> how many), its holds (a sorted
# set: "<id>:<tokens>" by the moment its lease ends). ARGV[1] = the window in milliseconds. A use counts until its
# second has left the window: up to a second longer than an exact window would keep it.
WINDOWS = NOW + """
local window = tonumber(ARGV[1])

-- What a window hash counted in the window, and the second of its oldest use; older seconds are dropped.
local function tally(key)
  local total, oldest, stale = 0, nil, {}
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local at = tonumber(fields[i])
    if (at + 1) * 1000 <= now - window then
      stale[#stale + 1] = fields[i]
    else
      total = total + tonumber(fields[i + 1])
      if oldest == nil or at < oldest then oldest = at end
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return total, oldest
end

-- Milliseconds until the uses of second `at` leave the window.
local function wait(at)
  return (at + 1) * 1000 + window - now
end

-- The tokens requests in flight hold; holds past their lease (their replica died) are dropped.
local function held(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local total = 0
  for _, hold in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    total = total + tonumber(string.match(hold, ':(%d+)$'))
  end
  return total
end

local function over_tokens(tokens, holds, limit)
  local charged, oldest = tally(tokens)
  if charged + held(holds) >= limit then
    return {2, oldest and wait(oldest) or 1000}  -- requests in flight may end any moment, using less than they hold
  end
end

local function count(key, amount)
  redis.call('HINCRBY', key, second, amount)
  redis.call('PEXPIRE', key, window + 1000)
end
"""  # fmt: skip

# A request's admission, in one call: KEYS = requests, tokens, holds. ARGV: window, requests per minute, tokens per
# minute (0: none), the request's hold ("<id>:<tokens>", or "" for none) and its lease in milliseconds.
# {0, 0} when admitted (counted, and its hold added), else {1 (requests) or 2 (tokens), milliseconds to wait}.
ADMIT = WINDOWS + """
local rpm, tpm, hold = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if rpm > 0 then
  local used, oldest = tally(KEYS[1])
  if used >= rpm then return {1, wait(oldest)} end
end
if tpm > 0 then
  local refusal = over_tokens(KEYS[2], KEYS[3], tpm)
  if refusal then return refusal end
end
if rpm > 0 then count(KEYS[1], 1) end
if hold ~= '' then
  local lease = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[3], now + lease, hold)
  redis.call('PEXPIRE', KEYS[3], lease)
end
return {0, 0}
"""  # fmt: skip

# KEYS: tokens, holds. ARGV: window, the hold, the tokens used.
SETTLE = WINDOWS + """
redis.call('ZREM', KEYS[2], ARGV[2])
local used = tonumber(ARGV[3])
if used > 0 then count(KEYS[1], used) end
return 1
"""  # fmt: skip

# A target's circuit: KEYS[1] = a hash of its consecutive failures and the moment its cooldown ends.
# Each answers {failures, milliseconds of cooldown left, 1 if this failure started a cooldown}.
CIRCUIT_READ = NOW + """
local state = redis.call('HMGET', KEYS[1], 'failures', 'cool_until')
return {tonumber(state[1]) or 0, math.max(0, (tonumber(state[2]) or 0) - now), 0}
"""  # fmt: skip

# ARGV: failures to cool, the cooldown in milliseconds.
CIRCUIT_FAILED = NOW + """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if failures < tonumber(ARGV[1]) then
  return {failures, math.max(0, (tonumber(redis.call('HGET', KEYS[1], 'cool_until')) or 0) - now), 0}
end
redis.call('HSET', KEYS[1], 'cool_until', now + tonumber(ARGV[2]))
return {failures, tonumber(ARGV[2]), 1}
"""  # fmt: skip

# Stored responses: KEYS = the index (a sorted set of response keys by when they were stored), the response's key
# (a hash: response, input). ARGV: response, input, the most kept, their age limit in milliseconds. The expired
# leave the index; past the count the oldest go.
RESPONSE_PUT = NOW + """
local max_count, max_age = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('HSET', KEYS[2], 'response', ARGV[1], 'input', ARGV[2])
redis.call('PEXPIRE', KEYS[2], max_age)
redis.call('ZADD', KEYS[1], now, KEYS[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - max_age)
local excess = redis.call('ZCARD', KEYS[1]) - max_count
if excess > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[1], excess)
  for i = 1, #oldest, 2 do redis.call('DEL', oldest[i]) end
end
return 1
"""  # fmt: skip

# KEYS: the index, the response's key. 1 if it was there.
RESPONSE_DELETE = """
redis.call('ZREM', KEYS[1], KEYS[2])
return redis.call('DEL', KEYS[2])
"""
