-- roomcast's sequencing script: one run per batch of one instance's events, so Redis, the one
-- place every instance's messages pass, gives each room one sequence, one history and one set
-- of reaction totals. See src/backplane/redis_link.rs (the caller) and backplane/mod.rs (the
-- formats it publishes).
--
-- ARGV: origin, epoch for a room that has none, --history, --history-ttl (ms), --room-ttl (ms),
-- this instance's control channel, the batch's last event number, keys a room may count, then
-- the events, each an op and its number in the origin's sequence:
--   M n room body              a message: numbered, retained, published to the room
--   K n                        a marker: published on the control channel
--   R n room count k1 c1 ...   reaction taps: added to the totals, the sums published
--   S n room                   a snapshot of the room, published on the control channel
--   Q n room                   the same, but a room without state gets none (an empty one)
-- An event numbered at or below the origin's last run one is skipped: the publisher's retry of
-- a batch that reached Redis before its connection failed runs nothing twice.

local origin, fresh_epoch = ARGV[1], ARGV[2]
local history_limit, history_ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local room_ttl, control = tonumber(ARGV[5]), ARGV[6]
local max_keys = tonumber(ARGV[8])

local origin_key = 'roomcast:origin:' .. origin
local last_run = tonumber(redis.call('GET', origin_key) or '0')
redis.call('SET', origin_key, ARGV[7], 'PX', 86400000)

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local function keys(room)
  local tag = 'roomcast:v1:{' .. room .. '}:'
  return tag .. 'state', tag .. 'history', tag .. 'reactions'
end

-- The room's epoch (looked up once per run). A room without state (new, expired, or Redis
-- started empty) gets a new life: a fresh epoch, seq 0, no history, no totals.
local epochs = {}
local function epoch_of(room)
  if epochs[room] then
    return epochs[room]
  end
  local state, history, reactions = keys(room)
  local epoch = redis.call('HGET', state, 'epoch')
  if not epoch then
    epoch = fresh_epoch
    redis.call('DEL', history, reactions)
    redis.call('HSET', state, 'epoch', epoch, 'seq', 0)
  end
  redis.call('PEXPIRE', state, room_ttl)
  epochs[room] = epoch
  return epoch
end

local function counted(s)
  return #s .. ':' .. s
end

local i = 9
while i <= #ARGV do
  local op, number = ARGV[i], ARGV[i + 1]
  local fresh = tonumber(number) > last_run
  if op == 'M' then
    local room, body = ARGV[i + 2], ARGV[i + 3]
    i = i + 4
    if fresh then
      local epoch = epoch_of(room)
      local state, history = keys(room)
      local seq = redis.call('HINCRBY', state, 'seq', 1)
      local entry = string.format('%d %d\n', seq, now) .. body
      if history_limit > 0 then
        redis.call('RPUSH', history, entry)
        redis.call('LTRIM', history, -history_limit, -1)
        redis.call('PEXPIRE', history, history_ttl)
      end
      redis.call('PUBLISH', 'roomcast:room:' .. room, 'V' .. epoch .. ' ' .. entry)
    end
  elseif op == 'K' then
    i = i + 2
    redis.call('PUBLISH', control, 'marker ' .. number)
  elseif op == 'R' then
    local room, count = ARGV[i + 2], tonumber(ARGV[i + 3])
    local first = i + 4
    i = first + 2 * count
    if fresh then
      local epoch = epoch_of(room)
      local state, _, reactions = keys(room)
      for k = first, first + 2 * count - 1, 2 do
        if redis.call('HEXISTS', reactions, ARGV[k]) == 1
            or redis.call('HLEN', reactions) < max_keys then
          redis.call('HINCRBY', reactions, ARGV[k], ARGV[k + 1])
        end
      end
      redis.call('PEXPIRE', reactions, room_ttl)
      local seq = redis.call('HGET', state, 'seq')
      local out = { 'A', epoch, ' ', seq, ' ', origin, ' ', number, '\n' }
      for _, field in ipairs(redis.call('HGETALL', reactions)) do
        out[#out + 1] = counted(field)
      end
      redis.call('PUBLISH', 'roomcast:room:' .. room, table.concat(out))
    end
  elseif op == 'S' or op == 'Q' then
    local room = ARGV[i + 2]
    i = i + 3
    local state, history, reactions = keys(room)
    if fresh and op == 'Q' and redis.call('EXISTS', state) == 0 then
      redis.call('PUBLISH', control, 'snapshot ' .. number .. ' ' .. room .. '\n')
    elseif fresh then
      -- A join creates the room's state, as on one instance.
      local epoch = epoch_of(room)
      local cutoff = now - history_ttl
      local out = { 'snapshot ', number, ' ', room, '\n', counted(epoch),
        counted(redis.call('HGET', state, 'seq')) }
      local totals = redis.call('HGETALL', reactions)
      out[#out + 1] = counted(tostring(#totals / 2))
      for _, field in ipairs(totals) do
        out[#out + 1] = counted(field)
      end
      for _, entry in ipairs(redis.call('LRANGE', history, 0, -1)) do
        local ts = tonumber(string.match(entry, '^%d+ (%d+)\n'))
        if ts and ts >= cutoff then
          out[#out + 1] = counted(entry)
        end
      end
      redis.call('PUBLISH', control, table.concat(out))
    end
  else
    return redis.error_reply('roomcast: unknown op ' .. tostring(op))
  end
end
return #ARGV
