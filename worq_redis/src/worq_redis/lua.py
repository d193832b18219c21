"""The Lua scripts behind every state change of a worq-redis queue.

Every queue script is atomic and takes all the keys it touches in ``KEYS``: the ten keys of one
queue, in the order of :data:`QUEUE_KEY_SUFFIXES`, then the prefix's job-id index (``KEYS[11]``,
shared by every queue, see :func:`worq_redis.connection.ids_key`), then per-job result keys where
it writes or deletes records. It validates its arguments before its first write, so a script that
fails changes nothing. The one exception is ``job_state``, a read-only lookup by job id alone: it
takes the index and reads the keys of the queue it finds there.

``ARGV[1]`` of every script is the clock: empty for Redis ``TIME`` (the normal case), or a Unix
time in seconds that tests pass to drive time by hand.

A job's small state lives in the queue's ``meta`` hash as ``state|attempts|seq|score|extra``,
followed by ``|flags`` when it has any:

* ``state``: ``q`` queued, ``s`` scheduled, ``r`` retrying, ``l`` leased (running), ``d`` dead;
* ``attempts``: fetches so far (a release takes its fetch back);
* ``seq``: a 16-digit sequence number from enqueue (or requeue), so FIFO holds within a priority;
* ``score``: the job's ``ready`` score, minus its priority;
* ``extra``: the lease token when leased, the time it died when dead, else empty;
* ``flags``: ``c`` when a cancel was requested while it ran (until it is settled), ``p`` while
  the queue's ``progress`` hash holds its progress (only while leased). Jobs without flags keep
  the five-field form, so the hot path writes exactly what it wrote before flags existed.

A queued job's member in ``ready`` is ``seq .. id``: equal scores sort by member, so the
sequence number keeps FIFO order within a priority level without limiting the priority range.

The index ``<prefix>:ids`` maps every job id the broker holds, in any state and any queue, to
its queue: enqueue adds an id only if the index lacks it (``HSETNX``, or ``HMGET`` for a batch),
and the scripts that drop a job for good (ack, cancel of a waiting job, purge and trim of dead
jobs) remove it, so an id is unique across the queues of a prefix.
"""

from __future__ import annotations

import re
from typing import Final

QUEUE_KEY_SUFFIXES: Final = (
    "ready",
    "delayed",
    "leased",
    "jobs",
    "meta",
    "dead",
    "signal",
    "seq",
    "reason",
    "progress",
)
"""The keys of one queue, as they are passed to every queue script (``KEYS[1]`` .. ``KEYS[10]``).

``KEYS[11]`` is the prefix's job-id index, and result keys (when a script takes any) follow it."""

NOTIFY_TTL_MS: Final = 10_000
"""How long a result's wake-up list lives; waiters blocked at that moment are served at once."""

_PRELUDE = r"""
local K_READY, K_DELAYED, K_LEASED, K_JOBS, K_META = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_DEAD, K_SIGNAL, K_SEQ, K_REASON, K_PROGRESS = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local K_IDS = KEYS[11]

local function f6(x)
  return string.format("%.6f", x)
end

local function clock(arg)
  if arg ~= nil and arg ~= "" then
    return tonumber(f6(tonumber(arg)))
  end
  local t = redis.call("TIME")
  return tonumber(f6(tonumber(t[1]) + tonumber(t[2]) / 1000000))
end

local function number_arg(value, what)
  local n = tonumber(value)
  if n == nil then
    error("worq: bad " .. what .. ": " .. tostring(value))
  end
  return n
end

local function parse(m)
  local st, at, sq, sc, ex, fl = string.match(m, "^(%a)|(%d+)|(%d+)|([^|]*)|([^|]*)|?(%a*)$")
  return {st = st, at = tonumber(at), sq = sq, sc = sc, ex = ex, fl = fl}
end

local function pack(j)
  local m = j.st .. "|" .. string.format("%d", j.at) .. "|" .. j.sq .. "|" .. j.sc .. "|" .. j.ex
  if j.fl ~= "" then
    return m .. "|" .. j.fl
  end
  return m
end

-- Whether the job's meta carries `flag` (c: cancel requested, p: has progress).
local function has(j, flag)
  return j.fl ~= "" and string.find(j.fl, flag, 1, true) ~= nil
end

local function next_seq()
  return string.format("%016d", redis.call("INCR", K_SEQ))
end

-- A job leaves its lease: drop the progress it reported, if any (the caller writes its meta).
local function drop_progress(id, j)
  if has(j, "p") then
    redis.call("HDEL", K_PROGRESS, id)
    j.fl = string.gsub(j.fl, "p", "")
  end
end

-- Put a job (with its meta already parsed) back in ready under its own sequence number.
-- A requested cancel stays with it (its next delivery says so); its progress does not.
local function to_ready(id, j)
  drop_progress(id, j)
  j.st = "q"
  j.ex = ""
  redis.call("HSET", K_META, id, pack(j))
  redis.call("ZADD", K_READY, j.sc, j.sq .. id)
end

-- Drop a job for good (`j`: its parsed meta, or nil for a dead job): its id is free again.
-- A leased job on its first attempt was never retried, so it has no reason to delete.
local function forget(id, j)
  redis.call("HDEL", K_JOBS, id)
  redis.call("HDEL", K_META, id)
  redis.call("HDEL", K_IDS, id)
  if j == nil or j.st ~= "l" or j.at > 1 then
    redis.call("HDEL", K_REASON, id)
  end
  if j ~= nil and has(j, "p") then
    redis.call("HDEL", K_PROGRESS, id)
  end
end

-- The job if `token` holds an unexpired lease on it, else nil.
local function held(id, token, now)
  local m = redis.call("HGET", K_META, id)
  if not m then
    return nil
  end
  local j = parse(m)
  if j.st ~= "l" or j.ex ~= token then
    return nil
  end
  local deadline = redis.call("ZSCORE", K_LEASED, id)
  if not deadline or tonumber(deadline) <= now then
    return nil
  end
  return j
end

-- Move up to `limit` jobs whose score in the ZSET `key` has passed `now` back to ready.
local function due_to_ready(key, now, limit)
  local ids = redis.call("ZRANGEBYSCORE", key, "-inf", f6(now), "LIMIT", 0, limit)
  for _, id in ipairs(ids) do
    redis.call("ZREM", key, id)
    local m = redis.call("HGET", K_META, id)
    if m then
      to_ready(id, parse(m))
    end
  end
  return #ids
end

-- Return up to `limit` expired leases to ready; their attempt stays counted.
local function reap(now, limit)
  return due_to_ready(K_LEASED, now, limit)
end

-- Move up to `limit` delayed jobs that are due to ready.
local function promote(now, limit)
  return due_to_ready(K_DELAYED, now, limit)
end

-- Drop the oldest dead jobs while there are too many or the oldest is too old.
local function trim_dead(now, max_count, max_age)
  while true do
    local oldest = redis.call("ZRANGE", K_DEAD, 0, 0)
    if #oldest == 0 then
      return
    end
    local id = oldest[1]
    local m = redis.call("HGET", K_META, id)
    local died = m and tonumber(parse(m).ex) or 0
    if redis.call("ZCARD", K_DEAD) <= max_count and now - died <= max_age then
      return
    end
    redis.call("ZREM", K_DEAD, id)
    forget(id, nil)
  end
end

-- Store a job's record (result, final error or cancellation) and wake whoever waits for it.
local function put_result(k, ttl_ms, record)
  if ttl_ms <= 0 then
    redis.call("DEL", KEYS[k])
    return
  end
  redis.call("SET", KEYS[k], record, "PX", ttl_ms)
  if redis.call("EXISTS", KEYS[k + 1]) == 1 then
    redis.call("DEL", KEYS[k + 1], KEYS[k + 2])
    redis.call("RPUSH", KEYS[k + 2], "1")
    redis.call("PEXPIRE", KEYS[k + 2], __NOTIFY_TTL_MS__)
  end
end

-- Check settlement values ARGV[first .. last] (8 per settlement) before any write.
local function check_settlements(first, last)
  for i = first, last, 8 do
    local outcome = ARGV[i + 2]
    if outcome ~= "a" and outcome ~= "r" and outcome ~= "d" then
      error("worq: bad outcome " .. tostring(outcome))
    end
    number_arg(ARGV[i + 3], "delay")
    local k = number_arg(ARGV[i + 5], "key index")
    if k ~= 0 and KEYS[k + 2] == nil then
      error("worq: missing result keys")
    end
    number_arg(ARGV[i + 6], "ttl")
  end
end

-- Apply checked settlements ARGV[first .. last]: 1 per applied one, 0 per refused one.
--   id, token, outcome (a|r|d), delay, reason, result key index (0: none), ttl ms, record
-- KEYS[k], KEYS[k+1], KEYS[k+2]: a job's result, waiting marker and wake-up list; the record is
-- written whatever the outcome. A settled job's progress is done with, and so is a requested
-- cancel unless the job is retried (its next delivery then carries the request).
local function apply_settlements(now, first, last, max_count, max_age)
  local out = {}
  local died = false
  for i = first, last, 8 do
    local id, outcome = ARGV[i], ARGV[i + 2]
    local j = held(id, ARGV[i + 1], now)
    if j == nil then
      out[#out + 1] = 0
    else
      out[#out + 1] = 1
      redis.call("ZREM", K_LEASED, id)
      if outcome == "a" then
        forget(id, j)
      else
        drop_progress(id, j)
        if outcome ~= "r" then
          j.fl = ""  -- a retry keeps a cancel request: its next delivery carries it
        end
        redis.call("HSET", K_REASON, id, ARGV[i + 4])
        if outcome == "r" then
          j.st = "r"
          j.ex = ""
          redis.call("HSET", K_META, id, pack(j))
          redis.call("ZADD", K_DELAYED, f6(now + tonumber(ARGV[i + 3])), id)
          redis.call("ZADD", K_SIGNAL, 0, "due")
        else
          j.st = "d"
          j.ex = f6(now)
          redis.call("HSET", K_META, id, pack(j))
          redis.call("ZADD", K_DEAD, redis.call("INCR", K_SEQ), id)
          died = true
        end
      end
      local k = tonumber(ARGV[i + 5])
      if k ~= 0 then
        put_result(k, tonumber(ARGV[i + 6]), ARGV[i + 7])
      end
    end
  end
  if died then
    trim_dead(now, max_count, max_age)
  end
  return out
end

-- Reap and promote (bounded), lease up to `limit` ready jobs, re-arm the wake-up signal.
-- Returns {now, next due time or "", then per job: id, body, token, attempts, cancel (0|1)}.
-- The earliest lease deadline and due time are read first: reaping and promoting run only when
-- one of them has passed, and they give the next due time unless something moved.
local function fetch(now, limit, lease, reap_limit, promote_limit)
  local l = redis.call("ZRANGE", K_LEASED, 0, 0, "WITHSCORES")
  if #l > 0 and tonumber(l[2]) <= now then
    reap(now, reap_limit)
    l = nil
  end
  local d = redis.call("ZRANGE", K_DELAYED, 0, 0, "WITHSCORES")
  if #d > 0 and tonumber(d[2]) <= now then
    promote(now, promote_limit)
    d = nil
  end
  local out = {f6(now), ""}
  local got = 0
  local until_ = f6(now + lease)
  local ready_left = true
  if limit > 0 then
    local popped = redis.call("ZPOPMIN", K_READY, limit)
    ready_left = #popped >= 2 * limit -- fewer than asked: ready is empty now
    for i = 1, #popped, 2 do
      local id = string.sub(popped[i], 17)
      local m = redis.call("HGET", K_META, id)
      if m then
        local j = parse(m)
        j.at = j.at + 1
        j.st = "l"
        j.ex = string.format("%d", redis.call("INCR", K_SEQ))
        redis.call("HSET", K_META, id, pack(j))
        redis.call("ZADD", K_LEASED, until_, id)
        out[#out + 1] = id
        out[#out + 1] = redis.call("HGET", K_JOBS, id)
        out[#out + 1] = j.ex
        out[#out + 1] = j.at
        out[#out + 1] = has(j, "c") and 1 or 0
        got = got + 1
      end
    end
  end
  if ready_left and redis.call("ZCARD", K_READY) > 0 then
    redis.call("ZADD", K_SIGNAL, 0, "ready")
  else
    redis.call("ZREM", K_SIGNAL, "ready")
  end
  if got == 0 then
    -- This caller is about to block with a timeout computed from the next due time below.
    redis.call("ZREM", K_SIGNAL, "due")
  end
  if d == nil then
    d = redis.call("ZRANGE", K_DELAYED, 0, 0, "WITHSCORES")
  end
  local next_due = nil
  if #d > 0 then
    next_due = tonumber(d[2])
  end
  if l == nil then
    l = redis.call("ZRANGE", K_LEASED, 0, 0, "WITHSCORES")
  elseif got > 0 and (#l == 0 or tonumber(until_) < tonumber(l[2])) then
    l = {"", until_} -- the leases just taken are the earliest
  end
  if #l > 0 and (next_due == nil or tonumber(l[2]) < next_due) then
    next_due = tonumber(l[2])
  end
  if next_due ~= nil then
    out[2] = f6(next_due)
  end
  return out
end
""".replace("__NOTIFY_TTL_MS__", str(NOTIFY_TTL_MS))

ENQUEUE = r"""
-- ARGV: clock, queue, register (0|1), n, then n x (id, body, ready score, eta or "",
--   result key index or 0)
-- KEYS: the queue's keys and the id index, the queue registry, then the result key of each job
-- whose old record it deletes when it adds the job (Message.clear_record).
-- An id already in the index (in any queue, in any state) is left alone: 0 for it, 1 if added.
-- With register 1 (the broker's first enqueue into the queue), a queue that gets a job is added
-- to the registry, so stats() lists the queues that held a job.
-- A batch costs a handful of calls, not a handful per job: one HMGET of the index finds the ids
-- already held, one INCRBY numbers the new jobs (in order), and HSET/ZADD write them in chunks.
local queue, register = ARGV[2], ARGV[3] == "1"
local n = number_arg(ARGV[4], "count")
local timed = false
for i = 0, n - 1 do
  local b = 5 + i * 5
  number_arg(ARGV[b + 2], "priority score")
  if ARGV[b + 3] ~= "" then
    number_arg(ARGV[b + 3], "eta")
    timed = true
  end
  local k = number_arg(ARGV[b + 4], "key index")
  if k ~= 0 and KEYS[k] == nil then
    error("worq: missing result key")
  end
end
local now = 0 -- the clock is read only when some job has an eta
if timed then
  now = clock(ARGV[1])
end
if n == 1 then
  -- One job (enqueue one by one): the direct calls, without the batch's tables.
  local id, score, eta = ARGV[5], ARGV[7], ARGV[8]
  if redis.call("HSETNX", K_IDS, id, queue) == 0 then
    return {0}
  end
  if register then
    redis.call("SADD", KEYS[12], queue)
  end
  local sq = next_seq()
  redis.call("HSET", K_JOBS, id, ARGV[6])
  if eta ~= "" and tonumber(eta) > now then
    redis.call("HSET", K_META, id, "s|0|" .. sq .. "|" .. score .. "|")
    redis.call("ZADD", K_DELAYED, f6(tonumber(eta)), id)
    redis.call("ZADD", K_SIGNAL, 0, "due")
  else
    redis.call("HSET", K_META, id, "q|0|" .. sq .. "|" .. score .. "|")
    redis.call("ZADD", K_READY, score, sq .. id)
    redis.call("ZADD", K_SIGNAL, 0, "ready")
  end
  if ARGV[9] ~= "0" then
    redis.call("DEL", KEYS[tonumber(ARGV[9])])
  end
  return {1}
end
local CHUNK = 1000
local function write(command, key, values)
  for i = 1, #values, CHUNK do
    redis.call(command, key, unpack(values, i, math.min(i + CHUNK - 1, #values)))
  end
end
local out = {}
local fresh = {}
local seen = {}
for i = 0, n - 1, CHUNK do
  local ids = {}
  for k = i, math.min(i + CHUNK, n) - 1 do
    ids[#ids + 1] = ARGV[5 + k * 5]
  end
  local known = redis.call("HMGET", K_IDS, unpack(ids))
  for k = 1, #ids do
    local id = ids[k]
    if known[k] or seen[id] then
      out[i + k] = 0
    else
      seen[id] = true
      out[i + k] = 1
      fresh[#fresh + 1] = i + k - 1
    end
  end
end
if #fresh == 0 then
  return out
end
if register then
  redis.call("SADD", KEYS[12], queue)
end
local seq = redis.call("INCRBY", K_SEQ, #fresh) - #fresh
local index, jobs, meta, ready, delayed, cleared = {}, {}, {}, {}, {}, {}
for _, i in ipairs(fresh) do
  local b = 5 + i * 5
  local id, score, eta = ARGV[b], ARGV[b + 2], ARGV[b + 3]
  seq = seq + 1
  local sq = string.format("%016d", seq)
  index[#index + 1] = id
  index[#index + 1] = queue
  jobs[#jobs + 1] = id
  jobs[#jobs + 1] = ARGV[b + 1]
  meta[#meta + 1] = id
  if eta ~= "" and tonumber(eta) > now then
    meta[#meta + 1] = "s|0|" .. sq .. "|" .. score .. "|"
    delayed[#delayed + 1] = f6(tonumber(eta))
    delayed[#delayed + 1] = id
  else
    meta[#meta + 1] = "q|0|" .. sq .. "|" .. score .. "|"
    ready[#ready + 1] = score
    ready[#ready + 1] = sq .. id
  end
  if ARGV[b + 4] ~= "0" then
    cleared[#cleared + 1] = KEYS[tonumber(ARGV[b + 4])]
  end
end
write("HSET", K_IDS, index)
write("HSET", K_JOBS, jobs)
write("HSET", K_META, meta)
write("ZADD", K_READY, ready)
write("ZADD", K_DELAYED, delayed)
for i = 1, #cleared, CHUNK do
  redis.call("DEL", unpack(cleared, i, math.min(i + CHUNK - 1, #cleared)))
end
if #ready > 0 then
  redis.call("ZADD", K_SIGNAL, 0, "ready")
end
if #delayed > 0 then
  redis.call("ZADD", K_SIGNAL, 0, "due")
end
return out
"""

FETCH = r"""
-- ARGV: clock, limit, lease seconds, reap limit, promote limit
-- Returns {now, next due time or "", then per job: id, body, token, attempts, cancel (0|1)}.
local now = clock(ARGV[1])
local limit = number_arg(ARGV[2], "limit")
local lease = number_arg(ARGV[3], "lease")
local reap_limit = number_arg(ARGV[4], "reap limit")
local promote_limit = number_arg(ARGV[5], "promote limit")
return fetch(now, limit, lease, reap_limit, promote_limit)
"""

EXTEND = r"""
-- ARGV: clock, lease seconds, then per lease 4 values: id, token, has progress (0|1), progress.
-- Returns per lease 0 (lost), 1 (held) or 2 (held, and a cancel was requested). A held lease's
-- progress is kept in the queue's progress hash until the job leaves its lease.
local now = clock(ARGV[1])
local lease = number_arg(ARGV[2], "lease")
for i = 3, #ARGV, 4 do
  local flag = ARGV[i + 2]
  if flag ~= "0" and flag ~= "1" then
    error("worq: bad progress flag " .. tostring(flag))
  end
end
local until_ = f6(now + lease)
local out = {}
for i = 3, #ARGV, 4 do
  local id = ARGV[i]
  local j = held(id, ARGV[i + 1], now)
  if j then
    redis.call("ZADD", K_LEASED, until_, id)
    if ARGV[i + 2] == "1" then
      redis.call("HSET", K_PROGRESS, id, ARGV[i + 3])
      if not has(j, "p") then
        j.fl = j.fl .. "p"
        redis.call("HSET", K_META, id, pack(j))
      end
    end
    out[#out + 1] = has(j, "c") and 2 or 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

SETTLE = r"""
-- ARGV: clock, dead max count, dead max age, then per settlement 8 values:
--   id, token, outcome (a|r|d), delay, reason, result key index (0: none), ttl ms, record
-- KEYS[k], KEYS[k+1], KEYS[k+2]: a job's result, waiting marker and wake-up list.
local now = clock(ARGV[1])
local max_count = number_arg(ARGV[2], "dead max count")
local max_age = number_arg(ARGV[3], "dead max age")
check_settlements(4, #ARGV)
return apply_settlements(now, 4, #ARGV, max_count, max_age)
"""

SETTLE_FETCH = r"""
-- A worker's steady state in one call: settle, then fetch from the same queue.
-- ARGV: clock, dead max count, dead max age, n, then n settlements of 8 values (as in settle),
--   then limit, lease seconds, reap limit, promote limit (as in fetch).
-- Returns {settle flags, fetch reply}. Everything is checked before the first write.
local now = clock(ARGV[1])
local max_count = number_arg(ARGV[2], "dead max count")
local max_age = number_arg(ARGV[3], "dead max age")
local last = 4 + 8 * number_arg(ARGV[4], "count")
local limit = number_arg(ARGV[last + 1], "limit")
local lease = number_arg(ARGV[last + 2], "lease")
local reap_limit = number_arg(ARGV[last + 3], "reap limit")
local promote_limit = number_arg(ARGV[last + 4], "promote limit")
check_settlements(5, last)
local flags = apply_settlements(now, 5, last, max_count, max_age)
return {flags, fetch(now, limit, lease, reap_limit, promote_limit)}
"""

RELEASE = r"""
-- ARGV: clock, then pairs (id, token). Unstarted jobs go back to ready, their fetch not counted.
local now = clock(ARGV[1])
local any = false
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local j = held(id, ARGV[i + 1], now)
  if j then
    redis.call("ZREM", K_LEASED, id)
    j.at = j.at - 1
    to_ready(id, j)
    any = true
  end
end
if any then
  redis.call("ZADD", K_SIGNAL, 0, "ready")
end
return any and 1 or 0
"""

REAP = r"""
-- ARGV: clock, limit. Returns how many expired leases went back to ready.
local now = clock(ARGV[1])
local n = reap(now, number_arg(ARGV[2], "limit"))
if n > 0 then
  redis.call("ZADD", K_SIGNAL, 0, "ready")
end
return n
"""

CANCEL = r"""
-- KEYS: the queue's keys and the id index, then, to write a record, the job's result, waiting
-- marker and wake-up list. ARGV: clock, id, queue, record ttl ms, record.
-- A waiting job (queued, scheduled, retrying, or leased with an expired lease) is removed from
-- every key and its id freed: "r", with the record written (and waiters woken). A running job
-- is flagged: "q"; extend then answers 2 for its lease and a later delivery carries the flag.
-- "n" for a dead or unknown job (nothing changes), and "m" when the index puts the job in
-- another queue than ARGV[3] (the caller looks it up again).
local now = clock(ARGV[1])
local id, queue = ARGV[2], ARGV[3]
local ttl = number_arg(ARGV[4], "ttl")
local owner = redis.call("HGET", K_IDS, id)
if not owner then
  return "n"
end
if owner ~= queue then
  return "m"
end
local m = redis.call("HGET", K_META, id)
if not m then
  return "n"
end
local j = parse(m)
if j.st == "d" then
  return "n"
end
if j.st == "l" then
  local deadline = redis.call("ZSCORE", K_LEASED, id)
  if deadline and tonumber(deadline) > now then
    if not has(j, "c") then
      j.fl = j.fl .. "c"
      redis.call("HSET", K_META, id, pack(j))
    end
    return "q"
  end
  redis.call("ZREM", K_LEASED, id)
elseif j.st == "q" then
  redis.call("ZREM", K_READY, j.sq .. id)
else
  redis.call("ZREM", K_DELAYED, id)
end
forget(id, j)
if #KEYS > 11 then
  put_result(12, ttl, ARGV[5])
end
return "r"
"""

STATS = r"""
-- ARGV: clock, dead max count, dead max age. Returns {ready, delayed, running, dead}.
local now = clock(ARGV[1])
trim_dead(now, number_arg(ARGV[2], "dead max count"), number_arg(ARGV[3], "dead max age"))
local due = redis.call("ZCOUNT", K_DELAYED, "-inf", f6(now))
local expired = redis.call("ZCOUNT", K_LEASED, "-inf", f6(now))
return {
  redis.call("ZCARD", K_READY) + due + expired,
  redis.call("ZCARD", K_DELAYED) - due,
  redis.call("ZCARD", K_LEASED) - expired,
  redis.call("ZCARD", K_DEAD),
}
"""

DEAD_JOBS = r"""
-- ARGV: clock, dead max count, dead max age, limit. Newest first: id, body, reason, attempts, died.
local now = clock(ARGV[1])
trim_dead(now, number_arg(ARGV[2], "dead max count"), number_arg(ARGV[3], "dead max age"))
local limit = number_arg(ARGV[4], "limit")
local out = {}
if limit <= 0 then
  return out
end
for _, id in ipairs(redis.call("ZREVRANGE", K_DEAD, 0, limit - 1)) do
  local j = parse(redis.call("HGET", K_META, id))
  out[#out + 1] = id
  out[#out + 1] = redis.call("HGET", K_JOBS, id)
  out[#out + 1] = redis.call("HGET", K_REASON, id) or ""
  out[#out + 1] = j.at
  out[#out + 1] = j.ex
end
return out
"""

REQUEUE_DEAD = r"""
-- ARGV: clock, dead max count, dead max age, "all" or "ids", then ids.
-- Retention first (a job past it is gone, not requeued); then dead jobs go to the back of
-- ready, attempts reset.
local now = clock(ARGV[1])
trim_dead(now, number_arg(ARGV[2], "dead max count"), number_arg(ARGV[3], "dead max age"))
local ids
if ARGV[4] == "all" then
  ids = redis.call("ZRANGE", K_DEAD, 0, -1)
else
  ids = {}
  for i = 5, #ARGV do
    ids[#ids + 1] = ARGV[i]
  end
end
local n = 0
for _, id in ipairs(ids) do
  if redis.call("ZREM", K_DEAD, id) == 1 then
    local j = parse(redis.call("HGET", K_META, id))
    j.at = 0
    j.sq = next_seq()
    redis.call("HDEL", K_REASON, id)
    to_ready(id, j)
    n = n + 1
  end
end
if n > 0 then
  redis.call("ZADD", K_SIGNAL, 0, "ready")
end
return n
"""

PURGE_DEAD = r"""
-- ARGV: clock, dead max count, dead max age. Retention first, then deletes every dead job left
-- (their ids are free again); returns how many that was.
local now = clock(ARGV[1])
trim_dead(now, number_arg(ARGV[2], "dead max count"), number_arg(ARGV[3], "dead max age"))
local ids = redis.call("ZRANGE", K_DEAD, 0, -1)
for _, id in ipairs(ids) do
  forget(id, nil)
end
redis.call("DEL", K_DEAD)
return #ids
"""

JOB_STATE = r"""
-- KEYS: the id index. ARGV: clock, id, key prefix.
-- Read-only: the job's queue from the index, then its state as if due jobs and expired leases
-- were already moved. The one script that reads keys it is not given (the keys of the queue it
-- finds, by name), so that a lookup by job id alone is one call.
-- Returns false, or {queue, state, attempts, cancel requested (0|1), [progress while running]}.
local now = clock(ARGV[1])
local id = ARGV[2]
local queue = redis.call("HGET", KEYS[1], id)
if not queue then
  return false
end
local base = ARGV[3] .. ":{" .. queue .. "}:"
local m = redis.call("HGET", base .. "meta", id)
if not m then
  return false
end
local j = parse(m)
local out = {queue, j.st, j.at, has(j, "c") and 1 or 0}
if j.st == "l" then
  local deadline = redis.call("ZSCORE", base .. "leased", id)
  if not deadline or tonumber(deadline) <= now then
    out[2] = "q"
  elseif has(j, "p") then
    out[5] = redis.call("HGET", base .. "progress", id)
  end
elseif j.st == "s" or j.st == "r" then
  local due = redis.call("ZSCORE", base .. "delayed", id)
  if not due or tonumber(due) <= now then
    out[2] = "q"
  end
end
return out
"""

SAVE_RESULT = r"""
-- KEYS: result, waiting marker, wake-up list. ARGV: clock, ttl ms, record.
local ttl = number_arg(ARGV[2], "ttl")
put_result(1, ttl, ARGV[3])
return 1
"""

ARM_WAIT = r"""
-- KEYS: result, waiting marker, wake-up list. ARGV: clock, marker ttl ms.
-- The record if there is one; else marks the job as waited on (so its writer pushes a wake-up)
-- and drops a stale wake-up left by a record that has expired since.
local ttl = number_arg(ARGV[2], "ttl")
local record = redis.call("GET", KEYS[1])
if record then
  return record
end
redis.call("DEL", KEYS[3])
redis.call("SET", KEYS[2], "1", "PX", ttl)
return false
"""

QUEUE_SCRIPTS: Final = {
    "enqueue": ENQUEUE,
    "fetch": FETCH,
    "extend": EXTEND,
    "settle": SETTLE,
    "settle_fetch": SETTLE_FETCH,
    "release": RELEASE,
    "reap": REAP,
    "cancel": CANCEL,
    "stats": STATS,
    "dead_jobs": DEAD_JOBS,
    "requeue_dead": REQUEUE_DEAD,
    "purge_dead": PURGE_DEAD,
}
"""Scripts that take the ten keys of one queue and the id index (``enqueue``, ``settle``,
``settle_fetch`` and ``cancel`` may add result keys after them)."""

LOOKUP_SCRIPTS: Final = {"job_state": JOB_STATE}
"""Scripts that take the id index alone and find the job's queue in it."""

RESULT_SCRIPTS: Final = {"save_result": SAVE_RESULT, "arm_wait": ARM_WAIT}
"""Scripts that take the three keys of one job's result."""


def _helpers(prelude: str) -> tuple[str, list[tuple[str, str]]]:
    """The prelude split into its key locals and its ``local function`` blocks, in order."""
    blocks = re.split(r"\n\n(?=(?:--[^\n]*\n)*local function )", prelude.strip("\n"))
    named = [(re.search(r"local function (\w+)", block)[1], block) for block in blocks[1:]]  # type: ignore[index]
    return blocks[0], named


def source(name: str) -> str:
    """The full source of script ``name``: the key locals, the helpers it uses, then its body.

    Only the helpers the body needs (directly or through other helpers) are included: Redis runs
    a script's whole chunk on every call, so each unused ``local function`` would cost a closure
    per call. Only queue scripts get the queue's key locals (``K_READY`` ...); the others name
    their keys themselves.
    """
    body = QUEUE_SCRIPTS.get(name) or LOOKUP_SCRIPTS.get(name) or RESULT_SCRIPTS[name]
    head, helpers = _helpers(_PRELUDE)
    needed: set[str] = set()
    text = body
    for helper, block in reversed(helpers):  # a helper only calls helpers defined above it
        if re.search(rf"\b{helper}\(", text):
            needed.add(helper)
            text += block
    kept = [block for helper, block in helpers if helper in needed]
    return "\n\n".join([head, *kept, body] if name in QUEUE_SCRIPTS else [*kept, body])
