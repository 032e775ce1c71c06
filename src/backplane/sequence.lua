-- roomcast's sequencing script: one run per batch of one instance's events, so Redis, the one
-- place every instance's messages pass, gives each room one sequence, one history and one set
-- of reaction totals. See src/backplane/redis_link.rs (the caller) and backplane/mod.rs (the
-- formats it publishes).
--
-- ARGV: origin, epoch for a room that has none, --history, --history-ttl (ms), --room-ttl (ms),
-- this instance's control channel, the batch's last event number, keys a room may count, the
-- most history bytes a snapshot carries, then the events, each an op and its number in the
-- origin's sequence:
--   M n room body              a message: numbered, retained, published to the room
--   K n                        a marker: published on the control channel
--   R n room count k1 c1 ...   reaction taps: added to the totals, the sums published
--   S n room                   a snapshot of the room, published on the control channel
--   Q n room                   the same, but a room without state gets none (an empty one)
--   E n room epoch             a new epoch for the room, if it still has `epoch` (Redis was
--                              restored from an older dump: its seqs went back)
-- An event numbered at or below the origin's last run one is skipped: the publisher's retry of
-- a batch that reached Redis before its connection failed runs nothing twice. An event that
-- fails (a room key someone overwrote with another type) is skipped and counted, not left to
-- stop the rest; the reply is how many failed.

local origin, fresh_epoch = ARGV[1], ARGV[2]
local history_limit, history_ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local room_ttl, control = tonumber(ARGV[5]), ARGV[6]
local max_keys, snapshot_bytes = tonumber(ARGV[8]), tonumber(ARGV[9])

local origin_key = 'roomcast:origin:' .. origin
local last_run = tonumber(redis.call('GET', origin_key) or '0')

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

-- Each op's work; `at` is where its arguments start (after op and number).
local ops = {}

ops.M = function(number, at)
  local room, body = ARGV[at], ARGV[at + 1]
  local epoch = epoch_of(room)
  local state, history = keys(room)
  -- The seq is taken only once the entry is retained: a write that fails leaves no hole.
  local seq = tonumber(redis.call('HGET', state, 'seq')) + 1
  local entry = string.format('%d %d\n', seq, now) .. body
  if history_limit > 0 then
    redis.call('RPUSH', history, entry)
    redis.call('LTRIM', history, -history_limit, -1)
    redis.call('PEXPIRE', history, history_ttl)
  end
  redis.call('HSET', state, 'seq', seq)
  redis.call('PUBLISH', 'roomcast:room:' .. room, 'V' .. epoch .. ' ' .. entry)
end

ops.K = function(number)
  redis.call('PUBLISH', control, 'marker ' .. number)
end

ops.R = function(number, at)
  local room, count = ARGV[at], tonumber(ARGV[at + 1])
  local epoch = epoch_of(room)
  local state, _, reactions = keys(room)
  for k = at + 2, at + 1 + 2 * count, 2 do
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

-- A snapshot: the newest retained messages within `snapshot_bytes`, so one join never sends
-- more than a subscriber's output buffer takes. `create`: a join makes the room's state, as
-- on one instance; a history request does not (an empty snapshot says there is none).
local function snapshot(number, room, create)
  local state, history, reactions = keys(room)
  if not create and redis.call('EXISTS', state) == 0 then
    redis.call('PUBLISH', control, 'snapshot ' .. number .. ' ' .. room .. '\n')
    return
  end
  local epoch = epoch_of(room)
  local cutoff = now - history_ttl
  local out = { 'snapshot ', number, ' ', room, '\n', counted(epoch),
    counted(redis.call('HGET', state, 'seq')) }
  local totals = redis.call('HGETALL', reactions)
  out[#out + 1] = counted(tostring(#totals / 2))
  for _, field in ipairs(totals) do
    out[#out + 1] = counted(field)
  end
  local entries, kept, bytes = redis.call('LRANGE', history, 0, -1), {}, 0
  for e = #entries, 1, -1 do
    local entry = entries[e]
    local ts = tonumber(string.match(entry, '^%d+ (%d+)\n'))
    bytes = bytes + #entry
    if not ts or ts < cutoff or bytes > snapshot_bytes then
      break
    end
    kept[#kept + 1] = entry
  end
  for e = #kept, 1, -1 do
    out[#out + 1] = counted(kept[e])
  end
  redis.call('PUBLISH', control, table.concat(out))
end

ops.E = function(number, at)
  local room, stale = ARGV[at], ARGV[at + 1]
  local state = keys(room)
  if redis.call('HGET', state, 'epoch') == stale then
    redis.call('HSET', state, 'epoch', fresh_epoch)
    epochs[room] = nil
  end
end

ops.S = function(number, at)
  snapshot(number, ARGV[at], true)
end

ops.Q = function(number, at)
  snapshot(number, ARGV[at], false)
end

-- How many arguments each op takes after its op and number.
local function width(op, at)
  if op == 'M' then
    return 2
  elseif op == 'R' then
    return 2 + 2 * tonumber(ARGV[at + 1])
  elseif op == 'E' then
    return 2
  elseif op == 'K' then
    return 0
  else
    return 1
  end
end

local failed = 0
local i = 10
while i <= #ARGV do
  local op, number = ARGV[i], ARGV[i + 1]
  local run = ops[op]
  if not run then
    return redis.error_reply('roomcast: unknown op ' .. tostring(op))
  end
  if op == 'K' or tonumber(number) > last_run then
    if not pcall(run, number, i + 2) then
      failed = failed + 1
    end
  end
  i = i + 2 + width(op, i + 2)
end
if tonumber(ARGV[7]) > last_run then
  redis.call('SET', origin_key, ARGV[7], 'PX', 86400000)
end
return failed
