"""The Lua scripts behind every state change of a worq-redis queue.

Every queue script is atomic and takes the keys it touches in ``KEYS``: the ten keys of one
queue, in the order of :data:`QUEUE_KEY_SUFFIXES`, then the prefix's job-id index (``KEYS[11]``,
shared by every queue, see :func:`worq_redis.connection.ids_key`), then per-job result keys where
it writes or deletes records (``enqueue`` and ``fire_schedule`` put the queue registry at
``KEYS[12]`` first, and ``fire_schedule`` the schedules hash at ``KEYS[13]``, sending its job
as workflow messages are sent, by name). The keys of
unique jobs and limits (:data:`DERIVED_KEY_SUFFIXES` and the per-key ``u:``, ``r:``, ``c:``,
``w:`` keys) are built by name from the queue's base, the name of ``KEYS[1]`` without
``ready`` (``qkey()``): their number depends on the jobs, and they share the queue's hash tag,
so a script still touches one slot besides the index. A plain job's script calls pass exactly
the keys they passed before those keys existed. Every script validates its arguments before its
first write, so a script that fails changes nothing. The one exception is ``job_state``, a
read-only lookup by job id alone: it takes the index and reads the keys of the queue it finds
there.

``ARGV[1]`` of every script is the clock: empty for Redis ``TIME`` (the normal case), or a Unix
time in seconds that tests pass to drive time by hand.

A job's small state lives in the queue's ``meta`` hash as ``state|attempts|seq|score|extra``,
followed by ``|flags`` when it has any:

* ``state``: ``q`` queued, ``s`` scheduled (or waiting for its rate slot), ``r`` retrying, ``l``
  leased (running), ``d`` dead, ``w`` parked (waiting for a concurrency permit);
* ``attempts``: fetches so far (a release takes its fetch back);
* ``seq``: a 16-digit sequence number from enqueue (or requeue), so FIFO holds within a priority;
* ``score``: the job's ``ready`` score, minus its priority;
* ``extra``: the lease token when leased, the time it died when dead, else empty;
* ``flags``: ``c`` when a cancel was requested while it ran (until it is settled), ``p`` while
  the queue's ``progress`` hash holds its progress (only while leased), ``u`` / ``U`` while it
  holds a unique key until done / until started (its record is in the ``unique`` hash), ``L``
  when it has limits (its record is in the ``limits`` hash), ``g`` while the rate slot it
  reserved is granted (set aside until the slot, or handed back unstarted by ``release``;
  cleared at its lease), ``k`` when it was woken
  from parking and a permit is reserved for it in ``c:<key>`` (cleared at its lease, or when
  its rate sets it aside and the permit goes on; should it ever be parked again, it goes back
  to the front of the line).
  Jobs without flags keep the five-field form, so the hot path writes exactly what it wrote
  before flags existed, and takes exactly the code path it took before.

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

DERIVED_KEY_SUFFIXES: Final = ("unique", "limits", "aside")
"""Further keys of one queue, which the scripts build by name from the queue's base (so they
share its hash tag) rather than take in ``KEYS``; they exist only while unique or limited jobs
use them:

* ``unique``: HASH job id -> ``mode|hold ms|key`` (mode ``s`` until started, ``d`` until done),
  for the unique jobs that have not let go of their key;
* ``limits``: HASH job id -> ``permits|interval|burst|bytes of ckey|ckey rkey``, for jobs with
  limits (``permits`` 0: no concurrency limit; ``interval`` empty: no rate limit);
* ``aside``: HASH parked job id -> its concurrency key.

With them, per key (the user's key after the colon): ``u:<key>`` STRING, the id of the job
holding a unique key (no TTL while it holds it; PX hold_for after it let go); ``r:<key>``
STRING, a rate key's theoretical arrival time, expiring when it falls behind the clock;
``c:<key>`` SET, the jobs holding a concurrency permit (counted while their lease is unexpired);
``w:<key>`` LIST, the jobs parked for a permit, oldest first."""

NOTIFY_TTL_MS: Final = 10_000
"""How long a result's wake-up list lives; waiters blocked at that moment are served at once."""

_PRELUDE = r"""
local K_READY, K_DELAYED, K_LEASED, K_JOBS, K_META = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_DEAD, K_SIGNAL, K_SEQ, K_REASON, K_PROGRESS = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local K_IDS = KEYS[11]
local K_REG = false -- the queue registry by name while in_queue() names another queue's keys

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

-- Whether the job's meta carries `flag` (see the module docstring: c, p, u, U, L, g, k).
local function has(j, flag)
  return j.fl ~= "" and string.find(j.fl, flag, 1, true) ~= nil
end

-- The name of a key of this queue that scripts build rather than take in KEYS (the `unique`,
-- `limits` and `aside` hashes, and the per-key `u:`, `r:`, `c:` and `w:` keys): the queue's
-- base (`<prefix>:{<queue>}:`, from K_READY) and `suffix`, so it shares the queue's slot.
local function qkey(suffix)
  return string.sub(K_READY, 1, -6) .. suffix
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

-- A unique job (flag u or U) lets go of its key: free at once, or, with a hold_for, still
-- answering its id for that many milliseconds (the key's TTL). Only if the job still holds it.
-- Its record and flag go (the caller writes its meta, if it keeps one).
local function unique_release(id, j)
  local record = redis.call("HGET", qkey("unique"), id)
  if record then
    local hold, ukey = string.match(record, "^%a|(%d+)|(.*)$")
    local key = qkey("u:" .. ukey)
    if redis.call("GET", key) == id then
      if hold ~= "0" then
        redis.call("PEXPIRE", key, hold)
      else
        redis.call("DEL", key)
      end
    end
    redis.call("HDEL", qkey("unique"), id)
  end
  j.fl = string.gsub(j.fl, "[uU]", "")
end

-- The id of the job holding unique key `ukey` in this queue, or nil when it is free. A key is
-- held while its holder has not let go of it (the holder is in the id index, in this queue,
-- with its unique record for this key), then for its hold_for (a key with a TTL). A key whose
-- holder is gone, or that a path forgot to let go of, is free: a key never gets stuck.
local function unique_holder(queue, ukey)
  local key = qkey("u:" .. ukey)
  local holder = redis.call("GET", key)
  if not holder then
    return nil
  end
  if redis.call("PTTL", key) ~= -1 then
    return holder
  end
  if redis.call("HGET", K_IDS, holder) ~= queue then
    return nil
  end
  local record = redis.call("HGET", qkey("unique"), holder)
  if record and string.match(record, "^%a|%d+|(.*)$") == ukey then
    return holder
  end
  return nil
end

-- Check a job's unique spec and limits record (as add_job takes them) before any write.
local function check_specs(uspec, lspec)
  if uspec ~= "" and not string.match(uspec, "^[sd]|%d+|") then
    error("worq: bad unique key " .. uspec)
  end
  if lspec ~= "" then
    local permits, interval, burst, n, rest =
      string.match(lspec, "^(%d+)|([^|]*)|(%d+)|(%d+)|(.*)$")
    local ok = permits ~= nil and #rest >= tonumber(n)
    if ok and interval ~= "" then
      local iv = tonumber(interval)
      ok = iv ~= nil and iv > 0 and iv < math.huge and tonumber(burst) >= 1
    elseif ok then
      ok = tonumber(permits) >= 1
    end
    if not ok then
      error("worq: bad limits " .. lspec)
    end
  end
end

-- Add one job unless its id is held anywhere (0) or, for a unique job, its key is held in this
-- queue (then the holder's id); 1 when added. `uspec`: "" or the unique record
-- "mode|hold ms|key" (mode s: until started, d: until done); `lspec`: "" or the limits record
-- (see limits_of); `wspec`: nil, "" or the workflow record (see workflow_of), kept in `wf`
-- (flag W). `clear`: the index of the result key to delete, or "0". With `register`, an added
-- job adds its queue to the registry (KEYS[12], or K_REG by name inside in_queue). A job
-- without any spec makes exactly the calls it made before unique jobs and limits existed.
local function add_job(now, queue, register, id, body, score, eta, clear, uspec, lspec, wspec)
  local fl = ""
  if uspec == "" then
    if redis.call("HSETNX", K_IDS, id, queue) == 0 then
      return 0
    end
  else
    if redis.call("HEXISTS", K_IDS, id) == 1 then
      return 0
    end
    local mode, ukey = string.match(uspec, "^(%a)|%d+|(.*)$")
    local holder = unique_holder(queue, ukey)
    if holder then
      return holder
    end
    redis.call("HSET", K_IDS, id, queue)
    redis.call("SET", qkey("u:" .. ukey), id)
    redis.call("HSET", qkey("unique"), id, uspec)
    fl = mode == "s" and "U" or "u"
  end
  if lspec ~= "" then
    redis.call("HSET", qkey("limits"), id, lspec)
    fl = fl .. "L"
  end
  if wspec ~= nil and wspec ~= "" then
    redis.call("HSET", qkey("wf"), id, wspec)
    fl = fl .. "W"
  end
  if fl ~= "" then
    fl = "|" .. fl
  end
  if register then
    redis.call("SADD", K_REG or KEYS[12], queue)
  end
  local sq = next_seq()
  redis.call("HSET", K_JOBS, id, body)
  if eta ~= "" and tonumber(eta) > now then
    redis.call("HSET", K_META, id, "s|0|" .. sq .. "|" .. score .. "|" .. fl)
    redis.call("ZADD", K_DELAYED, f6(tonumber(eta)), id)
    redis.call("ZADD", K_SIGNAL, 0, "due")
  else
    redis.call("HSET", K_META, id, "q|0|" .. sq .. "|" .. score .. "|" .. fl)
    redis.call("ZADD", K_READY, score, sq .. id)
    redis.call("ZADD", K_SIGNAL, 0, "ready")
  end
  if clear ~= "0" then
    redis.call("DEL", KEYS[tonumber(clear)])
  end
  return 1
end

-- A job's limits record (flag L) as {cl = permits (0: none), iv = rate interval (0: none),
-- burst, ck = concurrency key, rk = rate key}, or nil. Stored as
-- "permits|interval or empty|burst|bytes of ckey|" .. ckey .. rkey.
local function limits_of(id)
  local record = redis.call("HGET", qkey("limits"), id)
  if not record then
    return nil
  end
  local cl, iv, burst, n, rest = string.match(record, "^(%d+)|([^|]*)|(%d+)|(%d+)|(.*)$")
  n = tonumber(n)
  return {
    cl = tonumber(cl),
    iv = tonumber(iv) or 0,
    burst = tonumber(burst),
    ck = string.sub(rest, 1, n),
    rk = string.sub(rest, n + 1),
  }
end

-- A permit of concurrency key `ck` came back: the oldest job parked for it goes back to ready
-- at its own score and sequence number (the front of its priority level), with the permit
-- reserved for it (it joins `c:<ck>`, flagged k) until a fetch reaches it, so no other job of
-- the key takes it first. Stale entries (a job no longer parked) are skipped.
local function wake(ck)
  local list = qkey("w:" .. ck)
  while true do
    local id = redis.call("LPOP", list)
    if not id then
      return
    end
    redis.call("HDEL", qkey("aside"), id)
    local m = redis.call("HGET", K_META, id)
    if m then
      local j = parse(m)
      if j.st == "w" then
        if not has(j, "k") then
          j.fl = j.fl .. "k"
        end
        redis.call("SADD", qkey("c:" .. ck), id)
        to_ready(id, j)
        redis.call("ZADD", K_SIGNAL, 0, "ready")
        return
      end
    end
  end
end

-- A job with limits (flag L) leaves its lease (settled, released, reaped, cancelled), or a
-- woken job its reservation (cancelled, or set aside for its rate): the permit it holds, if
-- any, comes back and wakes the oldest job parked for its key.
local function leave_lease(id, j)
  if has(j, "L") then
    local lim = limits_of(id)
    if lim and lim.cl > 0 and redis.call("SREM", qkey("c:" .. lim.ck), id) == 1 then
      wake(lim.ck)
    end
  end
end

-- Drop a job for good (`j`: its parsed meta, or nil for a dead job): its id is free again,
-- and so is its unique key (whatever its mode); its limits record goes.
-- A leased job on its first attempt was never retried, so it has no reason to delete.
local function forget(id, j)
  redis.call("HDEL", K_JOBS, id)
  redis.call("HDEL", K_META, id)
  redis.call("HDEL", K_IDS, id)
  if j == nil or j.st ~= "l" or j.at > 1 then
    redis.call("HDEL", K_REASON, id)
  end
  if j == nil then
    redis.call("HDEL", qkey("limits"), id) -- a dead job keeps its limits (for requeue_dead)
  elseif j.fl ~= "" then
    if has(j, "p") then
      redis.call("HDEL", K_PROGRESS, id)
    end
    if has(j, "u") or has(j, "U") then
      unique_release(id, j)
    end
    if has(j, "L") then
      redis.call("HDEL", qkey("limits"), id)
    end
    if has(j, "W") then
      redis.call("HDEL", qkey("wf"), id)
    end
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

-- Move up to `limit` jobs whose score in the ZSET `key` has passed `now` back to ready; an
-- expired lease (`key` is K_LEASED) gives its permit back.
local function due_to_ready(key, now, limit)
  local ids = redis.call("ZRANGEBYSCORE", key, "-inf", f6(now), "LIMIT", 0, limit)
  for _, id in ipairs(ids) do
    redis.call("ZREM", key, id)
    local m = redis.call("HGET", K_META, id)
    if m then
      local j = parse(m)
      if key == K_LEASED then
        leave_lease(id, j)
      end
      to_ready(id, j)
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
    local j = m and parse(m) or nil
    local died = j and tonumber(j.ex) or 0
    if redis.call("ZCARD", K_DEAD) <= max_count and now - died <= max_age then
      return
    end
    redis.call("ZREM", K_DEAD, id)
    forget(id, j)
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

-- The key prefix, from the name of K_READY (`<prefix>:{<queue>}:ready`; a prefix has no braces).
local function key_prefix()
  return string.match(K_READY, "^(.-):{")
end

-- A workflow group's key, built by name: `<prefix>:grp:{<gid>}` (its own hash tag).
local function group_key(gid)
  return key_prefix() .. ":grp:{" .. gid .. "}"
end

-- Run fn() with the queue locals (K_READY .. K_PROGRESS, and K_REG for the registry) naming the
-- keys of queue `queue`, built by name as job_state builds them, so the queue helpers (add_job,
-- qkey ...) work on that queue; restored afterwards. For `then` messages and group callbacks,
-- which may go to other queues than the script's own.
local function in_queue(queue, fn)
  local saved = {
    K_READY, K_DELAYED, K_LEASED, K_JOBS, K_META, K_DEAD, K_SIGNAL, K_SEQ, K_REASON, K_PROGRESS,
    K_REG,
  }
  local prefix = key_prefix()
  local b = prefix .. ":{" .. queue .. "}:"
  K_READY, K_DELAYED, K_LEASED = b .. "ready", b .. "delayed", b .. "leased"
  K_JOBS, K_META, K_DEAD, K_SIGNAL = b .. "jobs", b .. "meta", b .. "dead", b .. "signal"
  K_SEQ, K_REASON, K_PROGRESS = b .. "seq", b .. "reason", b .. "progress"
  K_REG = prefix .. ":queues"
  local out = fn()
  K_READY, K_DELAYED, K_LEASED, K_JOBS, K_META = saved[1], saved[2], saved[3], saved[4], saved[5]
  K_DEAD, K_SIGNAL, K_SEQ, K_REASON, K_PROGRESS = saved[6], saved[7], saved[8], saved[9], saved[10]
  K_REG = saved[11]
  return out
end

-- Check a workflow record "index or empty|bytes of gid|" .. gid .. closes, or "".
local function check_wspec(w)
  if w == nil then
    error("worq: missing workflow record")
  end
  if w ~= "" then
    local n, rest = string.match(w, "^%d*|(%d+)|(.*)$")
    if n == nil or #rest < tonumber(n) then
      error("worq: bad workflow record " .. w)
    end
  end
end

-- Check the 10 values of a message at ARGV[q]: queue, register (0|1), id, body, ready score,
-- eta or "", clear record (0|1), unique spec, limits record, workflow record.
local function check_message(q)
  if ARGV[q] == nil or ARGV[q] == "" then
    error("worq: missing message")
  end
  number_arg(ARGV[q + 4], "priority score")
  if ARGV[q + 5] ~= "" then
    number_arg(ARGV[q + 5], "eta")
  end
  check_specs(ARGV[q + 7], ARGV[q + 8])
  check_wspec(ARGV[q + 9])
end

-- A job's workflow record (flag W, kept in `wf`) as {index (nil: not a member), group, closes
-- ("": none)}.
local function workflow_of(record)
  local index, n, rest = string.match(record, "^(%d*)|(%d+)|(.*)$")
  n = tonumber(n)
  return {index = tonumber(index), group = string.sub(rest, 1, n), closes = string.sub(rest, n + 1)}
end

-- Enqueue message `m` (the 10 values check_message checks) into its own queue, as enqueue adds
-- a job: 1 added, 0 id held, or the holder of its unique key.
local function send(now, m)
  local queue, id = m[1], m[3]
  local added = in_queue(queue, function()
    return add_job(now, queue, m[2] == "1", id, m[4], m[5], m[6], "0", m[8], m[9], m[10])
  end)
  if added == 1 and m[7] == "1" then
    redis.call("DEL", key_prefix() .. ":res:{" .. id .. "}")
  end
  return added
end

-- The step that counted a group's last index: mark it complete, enqueue its callback unless a
-- member failed and not run-on-failure, and let the state expire after its ttl.
local function group_complete(now, gkey)
  local g = redis.call(
    "HMGET", gkey, "ttl", "rof", "nf", "cq", "cr", "ci", "cb", "cs", "ce", "cc", "cu", "cl", "cw"
  )
  local sent = g[6] and (not g[3] or g[2] == "1")
  redis.call("HSET", gkey, "done", "1", "sent", sent and "1" or "0")
  if sent then
    send(now, {g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13]})
  end
  redis.call("PEXPIRE", gkey, g[1])
end

-- Count index `index` of group `gid` once, with status a (acknowledged), d (dead) or c
-- (cancelled) and its output (nil: none). An unknown or released group: nothing.
local function group_count(now, gid, index, status, output)
  local gkey = group_key(gid)
  local size = tonumber(redis.call("HGET", gkey, "size"))
  if size == nil or index >= size then
    return
  end
  local value = output and (status .. "=" .. output) or (status .. "-")
  if redis.call("HSETNX", gkey, "i:" .. index, value) == 0 then
    return -- counted before
  end
  if status ~= "a" then
    redis.call("HINCRBY", gkey, "nf", 1)
  end
  if redis.call("HINCRBY", gkey, "n", 1) == size then
    group_complete(now, gkey)
  end
end

-- A job with a workflow record ended (acknowledged, dead, removed by cancel): count it in its
-- group, then release the group it closes.
local function workflow_end(now, record, status, output)
  local w = workflow_of(record)
  if w.index then
    group_count(now, w.group, w.index, status, output)
  end
  if w.closes ~= "" then
    redis.call("DEL", group_key(w.closes))
  end
end

-- Check the workflow block of a settlement at ARGV[p]: output flag (0|1), output, count of
-- `then` messages, then 10 values per message; returns where the next block starts.
local function check_block(p)
  local flag = ARGV[p]
  if flag ~= "0" and flag ~= "1" then
    error("worq: bad output flag " .. tostring(flag))
  end
  local c = number_arg(ARGV[p + 2], "then count")
  for q = p + 3, p + 2 + 10 * c, 10 do
    check_message(q)
  end
  return p + 3 + 10 * c
end

-- Check settlement values ARGV[first .. last] (8 per settlement) before any write. An outcome
-- in capitals (A, R, D) has a workflow block (output, `then` messages), in order from ARGV[extras]
-- on: returns their positions by settlement, or nil when there are none.
local function check_settlements(first, last, extras)
  local blocks = nil
  for i = first, last, 8 do
    local outcome = ARGV[i + 2]
    if outcome ~= "a" and outcome ~= "r" and outcome ~= "d" then
      if (outcome ~= "A" and outcome ~= "R" and outcome ~= "D") or extras == nil then
        error("worq: bad outcome " .. tostring(outcome))
      end
      blocks = blocks or {}
      blocks[i] = extras
      extras = check_block(extras)
    end
    number_arg(ARGV[i + 3], "delay")
    local k = number_arg(ARGV[i + 5], "key index")
    if k ~= 0 and KEYS[k + 2] == nil then
      error("worq: missing result keys")
    end
    number_arg(ARGV[i + 6], "ttl")
  end
  return blocks
end

-- Apply checked settlements ARGV[first .. last]: 1 per applied one, 0 per refused one.
--   id, token, outcome (a|r|d), delay, reason, result key index (0: none), ttl ms, record
-- KEYS[k], KEYS[k+1], KEYS[k+2]: a job's result, waiting marker and wake-up list; the record is
-- written whatever the outcome. A settled job's progress is done with, and so is a requested
-- cancel unless the job is retried (its next delivery then carries the request).
-- `blocks` (from check_settlements): a settlement's workflow block; when it applies, a member's
-- ack or dead counts in its group and releases the group it closes, and its `then` messages
-- are enqueued, all in this step.
local function apply_settlements(now, first, last, max_count, max_age, blocks)
  local out = {}
  local died = false
  for i = first, last, 8 do
    local id, outcome = ARGV[i], ARGV[i + 2]
    local block = nil
    if blocks then
      block = blocks[i]
      outcome = string.lower(outcome)
    end
    local j = held(id, ARGV[i + 1], now)
    if j == nil then
      out[#out + 1] = 0
    else
      out[#out + 1] = 1
      local wf = nil
      if j.fl ~= "" and has(j, "W") and outcome ~= "r" then
        wf = redis.call("HGET", qkey("wf"), id)
      end
      redis.call("ZREM", K_LEASED, id)
      leave_lease(id, j)
      if outcome == "a" then
        forget(id, j)
      else
        drop_progress(id, j)
        if outcome ~= "r" then
          -- A retry keeps a cancel request (its next delivery carries it) and its unique key;
          -- a dead job lets go of its key and keeps only its limits (for requeue_dead).
          if has(j, "u") then
            unique_release(id, j)
          end
          j.fl = has(j, "L") and "L" or ""
          if wf then
            -- counted (and its group released) below, once and for all: a requeued dead job
            -- changes nothing in a group, so it needs no workflow record any more
            redis.call("HDEL", qkey("wf"), id)
          end
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
      if wf then
        local output = nil
        if block and ARGV[block] == "1" then
          output = ARGV[block + 1]
        end
        workflow_end(now, wf, outcome, output)
      end
      if block then
        for q = block + 3, block + 2 + 10 * tonumber(ARGV[block + 2]), 10 do
          send(now, {unpack(ARGV, q, q + 9)})
        end
      end
    end
  end
  if died then
    trim_dead(now, max_count, max_age)
  end
  return out
end

-- Whether concurrency key `ck` (of `cl` permits) has one free. Its holders count while their
-- lease is unexpired, and woken jobs while they wait in ready (queued, flag k); any other (a
-- lease that expired but is not reaped yet, a holder gone behind the scripts' backs) is
-- dropped, which wakes a parked job like any permit given back: the permit goes to that job,
-- so the answer is the set's size afterwards, woken jobs included.
local function permit_free(ck, cl, now)
  local set = qkey("c:" .. ck)
  if redis.call("SCARD", set) < cl then
    return true
  end
  local live = 0
  for _, holder in ipairs(redis.call("SMEMBERS", set)) do
    local deadline = redis.call("ZSCORE", K_LEASED, holder)
    local counts = deadline and tonumber(deadline) > now
    if not deadline then
      local m = redis.call("HGET", K_META, holder)
      counts = m and string.match(m, "^q|") and has(parse(m), "k")
    end
    if not counts then
      redis.call("SREM", set, holder)
      wake(ck)
    end
  end
  return redis.call("SCARD", set) < cl
end

-- GCRA with reservation on rate key `rk`: when the caller's slot starts (`now` or later), and
-- the key's theoretical arrival time (TAT) moves on by one interval, booked even when the slot
-- is later. The TAT key expires once it falls behind the clock (an idle key, the same as none);
-- under a test's clock (ARGV[1]) it is kept 10 minutes longer, since expiry runs on real time.
local function rate_slot(rk, iv, burst, now)
  local key = qkey("r:" .. rk)
  local tat = tonumber(redis.call("GET", key) or "") or now
  local start = math.max(now, tat - (burst - 1) * iv)
  tat = math.max(tat, now) + iv
  local ttl = math.ceil((tat - now) * 1000)
  if ARGV[1] ~= "" then
    ttl = ttl + 600000
  end
  redis.call("SET", key, string.format("%.17g", tat), "PX", string.format("%d", ttl))
  return start
end

-- A popped job with limits (flag L) asks to be leased at `now`: its concurrency permit first
-- (a woken job's is reserved for it), then its rate (skipped once by a job whose slot was
-- granted, flag g). Returns nil when it may go (its permit taken); else it is set aside, its
-- meta written, and it returns 0 when parked (state w, in `w:<ckey>` and `aside`) until a
-- permit comes back, or the time its rate slot starts, when scheduled (state s, flag g) until
-- then (a permit reserved for it goes on to the next parked job).
local function admit(id, j, now)
  local lim = limits_of(id)
  if lim == nil then
    return nil
  end
  local reserved = lim.cl > 0
    and has(j, "k")
    and redis.call("SISMEMBER", qkey("c:" .. lim.ck), id) == 1
  if lim.cl > 0 and not reserved and not permit_free(lim.ck, lim.cl, now) then
    j.st = "w"
    j.ex = ""
    redis.call("HSET", K_META, id, pack(j))
    redis.call(has(j, "k") and "LPUSH" or "RPUSH", qkey("w:" .. lim.ck), id)
    redis.call("HSET", qkey("aside"), id, lim.ck)
    return 0
  end
  if lim.iv > 0 and not has(j, "g") then
    local start = rate_slot(lim.rk, lim.iv, lim.burst, now)
    if start > now then
      if reserved then
        leave_lease(id, j)
      end
      j.st = "s"
      j.ex = ""
      j.fl = string.gsub(j.fl, "k", "") .. "g"
      redis.call("HSET", K_META, id, pack(j))
      redis.call("ZADD", K_DELAYED, f6(start), id)
      return start
    end
  end
  if lim.cl > 0 then
    redis.call("SADD", qkey("c:" .. lim.ck), id)
  end
  return nil
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
  local want, asides, timed, limited = limit, 0, false, false
  while want > 0 do
    local popped = redis.call("ZPOPMIN", K_READY, want)
    ready_left = #popped >= 2 * want -- fewer than asked: ready is empty now
    local set = 0
    for i = 1, #popped, 2 do
      local id = string.sub(popped[i], 17)
      local m = redis.call("HGET", K_META, id)
      if m then
        local j = parse(m)
        local aside = nil
        if j.fl ~= "" and has(j, "L") then
          aside = admit(id, j, now)
          limited = true
        end
        if aside then
          set = set + 1
          timed = timed or aside > 0
        else
          j.at = j.at + 1
          j.st = "l"
          j.ex = string.format("%d", redis.call("INCR", K_SEQ))
          if j.fl ~= "" then
            if has(j, "U") then
              unique_release(id, j) -- until started: its first lease lets go of the key
            end
            j.fl = string.gsub(j.fl, "[gk]", "") -- a granted slot, a reserved permit: used up
          end
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
    -- Jobs set aside leave free slots: pop again (they may also have woken parked jobs), so
    -- the jobs behind them are not held up, up to 100 set-asides per call.
    asides = asides + set
    want = 0
    if set > 0 and asides < 100 then
      want = math.min(limit - got, 100 - asides)
    end
  end
  if limited then
    ready_left = true -- admitting a job may have woken a parked one: look at ready itself
  end
  if timed then
    redis.call("ZADD", K_SIGNAL, 0, "due") -- a new earliest due time: blocked workers look again
    d = nil
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
--   result key index or 0), then, only when some job is unique or limited, n x (unique spec,
--   limits record), "" for none (see add_job), or, when some job has a workflow record, n x
--   (unique spec, limits record, workflow record).
-- KEYS: the queue's keys and the id index, the queue registry, then the result key of each job
-- whose old record it deletes when it adds the job (Message.clear_record).
-- Per job: 1 if added; 0 when its id is already in the index (in any queue, in any state); the
-- holder's id when its unique key is held in this queue. Jobs are added in order, so a unique
-- job added holds its key for the jobs after it.
-- With register 1 (the broker's first enqueue into the queue), a queue that gets a job is added
-- to the registry, so stats() lists the queues that held a job.
-- A batch of plain jobs costs a handful of calls, not a handful per job: one HMGET of the index
-- finds the ids already held, one INCRBY numbers the new jobs (in order), and HSET/ZADD write
-- them in chunks. A batch with unique or limited jobs adds them one by one (add_job).
local queue, register = ARGV[2], ARGV[3] == "1"
local n = number_arg(ARGV[4], "count")
local specs = 0 -- where the unique specs and limits records start, when there are any
local width = 2 -- specs per job: 3 with workflow records
if #ARGV == 4 + 7 * n and n > 0 then
  specs = 5 + 5 * n
elseif #ARGV == 4 + 8 * n and n > 0 then
  specs, width = 5 + 5 * n, 3
elseif #ARGV ~= 4 + 5 * n then
  error("worq: bad argument count")
end
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
  if specs > 0 then
    check_specs(ARGV[specs + width * i], ARGV[specs + width * i + 1])
    if width == 3 then
      check_wspec(ARGV[specs + 3 * i + 2])
    end
  end
end
local now = 0 -- the clock is read only when some job has an eta
if timed then
  now = clock(ARGV[1])
end
if n == 1 or specs > 0 then
  -- One job (enqueue one by one), or jobs with unique keys or limits: one add_job each, in
  -- order (one plain job makes the direct calls, without the batch's tables).
  local out = {}
  for i = 0, n - 1 do
    local b = 5 + i * 5
    local uspec, lspec, wspec = "", "", nil
    if specs > 0 then
      uspec, lspec = ARGV[specs + width * i], ARGV[specs + width * i + 1]
      if width == 3 then
        wspec = ARGV[specs + 3 * i + 2]
      end
    end
    out[i + 1] = add_job(
      now, queue, register, ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4],
      uspec, lspec, wspec
    )
    if out[i + 1] == 1 then
      register = false
    end
  end
  return out
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
-- With workflow blocks (outcomes in capitals), they follow the settlements, and the last value
-- is where they start (padded so that the count of values after the first three is no multiple
-- of 8): a plain call sends exactly what it always sent.
local now = clock(ARGV[1])
local max_count = number_arg(ARGV[2], "dead max count")
local max_age = number_arg(ARGV[3], "dead max age")
local last, extras = #ARGV, nil
if (#ARGV - 3) % 8 ~= 0 then
  extras = number_arg(ARGV[#ARGV], "workflow blocks")
  last = extras - 1
end
local blocks = check_settlements(4, last, extras)
return apply_settlements(now, 4, last, max_count, max_age, blocks)
"""

SETTLE_FETCH = r"""
-- A worker's steady state in one call: settle, then fetch from the same queue.
-- ARGV: clock, dead max count, dead max age, n, then n settlements of 8 values (as in settle),
--   then limit, lease seconds, reap limit, promote limit (as in fetch), then the settlements'
--   workflow blocks, if any (as in settle).
-- Returns {settle flags, fetch reply}. Everything is checked before the first write.
local now = clock(ARGV[1])
local max_count = number_arg(ARGV[2], "dead max count")
local max_age = number_arg(ARGV[3], "dead max age")
local last = 4 + 8 * number_arg(ARGV[4], "count")
local limit = number_arg(ARGV[last + 1], "limit")
local lease = number_arg(ARGV[last + 2], "lease")
local reap_limit = number_arg(ARGV[last + 3], "reap limit")
local promote_limit = number_arg(ARGV[last + 4], "promote limit")
local blocks = check_settlements(5, last, #ARGV > last + 4 and last + 5 or nil)
local flags = apply_settlements(now, 5, last, max_count, max_age, blocks)
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
    leave_lease(id, j)
    j.at = j.at - 1
    if has(j, "L") and not has(j, "g") then
      j.fl = j.fl .. "g" -- it never ran: the rate slot it took stays granted to it
    end
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
-- A waiting job (queued, scheduled, retrying, set aside by its limits, or leased with an
-- expired lease) is removed from every key and its id (and unique key) freed: "r", with the
-- record written (and waiters woken). A running job
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
  leave_lease(id, j)
elseif j.st == "q" then
  redis.call("ZREM", K_READY, j.sq .. id)
  if has(j, "k") then
    leave_lease(id, j) -- woken: the permit reserved for it goes on to the next parked job
  end
elseif j.st == "w" then
  local ck = redis.call("HGET", qkey("aside"), id)
  if ck then
    redis.call("LREM", qkey("w:" .. ck), 0, id)
    redis.call("HDEL", qkey("aside"), id)
  end
else
  redis.call("ZREM", K_DELAYED, id) -- scheduled, retrying, or waiting for its rate slot
end
local wf = nil
if j.fl ~= "" and has(j, "W") then
  wf = redis.call("HGET", qkey("wf"), id)
end
forget(id, j)
if #KEYS > 11 then
  put_result(12, ttl, ARGV[5])
end
if wf then
  workflow_end(now, wf, "c", nil) -- a removed member counts as failed; its closes releases
end
return "r"
"""

OPEN_GROUP = r"""
-- KEYS: the keys of the first member's queue (any queue's will do: every message goes to its
-- own queue, whose keys are built by name) and the id index, the queue registry, the group's key
-- `<prefix>:grp:{<gid>}`.
-- ARGV: clock, size, ttl ms, run on failure (0|1), has callback (0|1), the callback's 10 message
-- values (see check_message; empty when none), then n, then the members, 10 values each.
-- false when the group is already recorded (nothing changes); else the group is recorded (its
-- size, ttl, run-on-failure, and the callback to send) and each member added as enqueue adds a
-- job: per member 1 added, 0 id held, or its unique key's holder. A group of size 0 is complete
-- at once (its callback is sent, its ttl starts).
local gkey = KEYS[13]
local size = number_arg(ARGV[2], "size")
local ttl = number_arg(ARGV[3], "ttl")
local cb = ARGV[5] == "1"
if cb then
  check_message(6)
end
local n = number_arg(ARGV[16], "count")
if #ARGV ~= 16 + 10 * n then
  error("worq: bad argument count")
end
for q = 17, 16 + 10 * n, 10 do
  check_message(q)
end
if redis.call("EXISTS", gkey) == 1 then
  return false
end
local now = clock(ARGV[1])
local fields = {"size", ARGV[2], "ttl", string.format("%d", math.max(1, ttl)), "rof", ARGV[4]}
if cb then
  local names = {"cq", "cr", "ci", "cb", "cs", "ce", "cc", "cu", "cl", "cw"}
  for k = 1, 10 do
    fields[#fields + 1] = names[k]
    fields[#fields + 1] = ARGV[5 + k]
  end
end
redis.call("HSET", gkey, unpack(fields))
local out = {}
for q = 17, 16 + 10 * n, 10 do
  out[#out + 1] = send(now, {unpack(ARGV, q, q + 9)})
end
if size == 0 then
  group_complete(now, gkey)
end
return out
"""

STATS = r"""
-- ARGV: clock, dead max count, dead max age. Returns {ready, delayed, running, dead}.
-- Parked jobs (waiting for a permit) count as ready, jobs waiting for their rate slot as delayed.
local now = clock(ARGV[1])
trim_dead(now, number_arg(ARGV[2], "dead max count"), number_arg(ARGV[3], "dead max age"))
local due = redis.call("ZCOUNT", K_DELAYED, "-inf", f6(now))
local expired = redis.call("ZCOUNT", K_LEASED, "-inf", f6(now))
return {
  redis.call("ZCARD", K_READY) + due + expired + redis.call("HLEN", qkey("aside")),
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

LIST_JOBS = r"""
-- ARGV: which structure (ready | delayed | leased | dead), offset, limit. Read-only.
-- One page in its order (ready: fetch order; delayed, leased: by score; dead: newest first),
-- costing O(log n + offset + limit). Returns per job: id, body, state, attempts, at, reason.
local which = ARGV[1]
local offset = number_arg(ARGV[2], "offset")
local limit = number_arg(ARGV[3], "limit")
local out = {}
if limit <= 0 then
  return out
end
local last = offset + limit - 1
local ids, scores = {}, {}
if which == "ready" then
  for _, m in ipairs(redis.call("ZRANGE", K_READY, offset, last)) do
    ids[#ids + 1] = string.sub(m, 17)
  end
elseif which == "dead" then
  ids = redis.call("ZREVRANGE", K_DEAD, offset, last)
else
  local flat = redis.call("ZRANGE", which == "leased" and K_LEASED or K_DELAYED, offset, last,
    "WITHSCORES")
  for i = 1, #flat, 2 do
    ids[#ids + 1] = flat[i]
    scores[#ids] = flat[i + 1]
  end
end
for i, id in ipairs(ids) do
  local m = redis.call("HGET", K_META, id)
  if m then
    local j = parse(m)
    out[#out + 1] = id
    out[#out + 1] = redis.call("HGET", K_JOBS, id)
    out[#out + 1] = j.st
    out[#out + 1] = j.at
    out[#out + 1] = scores[i] or (j.st == "d" and j.ex) or ""
    out[#out + 1] = redis.call("HGET", K_REASON, id) or ""
  end
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

FIND_JOB = r"""
-- KEYS: the id index. ARGV: id, key prefix. Read-only, like job_state, reading the keys of the
-- queue it finds by name. Returns false, or {queue, state, attempts, body, at, reason}.
local id = ARGV[1]
local queue = redis.call("HGET", KEYS[1], id)
if not queue then
  return false
end
local base = ARGV[2] .. ":{" .. queue .. "}:"
local m = redis.call("HGET", base .. "meta", id)
if not m then
  return false
end
local j = parse(m)
local at = ""
if j.st == "l" then
  at = redis.call("ZSCORE", base .. "leased", id) or ""
elseif j.st == "s" or j.st == "r" then
  at = redis.call("ZSCORE", base .. "delayed", id) or ""
elseif j.st == "d" then
  at = j.ex
end
return {queue, j.st, j.at, redis.call("HGET", base .. "jobs", id), at,
  redis.call("HGET", base .. "reason", id) or ""}
"""

FIRE_SCHEDULE = r"""
-- KEYS: the keys of the job's queue and the id index, the queue registry, the schedules hash.
-- ARGV: clock, schedule, tick, last fire ("": no record yet), then the job's 10 message values
-- (see check_message).
-- A compare-and-set on the schedule's record (text, repr of a float, compared exactly): {0, 0}
-- when it is not `last`; else it becomes `tick` and the job is sent as enqueue adds it (a held
-- id or unique key adds nothing, and the tick still counts): {1, enqueue's answer}.
local schedule, tick, last = ARGV[2], ARGV[3], ARGV[4]
number_arg(tick, "tick")
check_message(5)
if (redis.call("HGET", KEYS[13], schedule) or "") ~= last then
  return {0, 0}
end
redis.call("HSET", KEYS[13], schedule, tick)
local now = 0 -- the clock is read only when the job has an eta, as enqueue reads it
if ARGV[10] ~= "" then
  now = clock(ARGV[1])
end
return {1, send(now, {unpack(ARGV, 5, 14)})}
"""

SCHEDULE_CAS = r"""
-- KEYS: the schedules hash. ARGV: clock, schedule, tick, last fire ("": no record yet).
-- fire_schedule without a job: the compare-and-set alone, 1 when applied.
number_arg(ARGV[3], "tick")
if (redis.call("HGET", KEYS[1], ARGV[2]) or "") ~= ARGV[4] then
  return 0
end
redis.call("HSET", KEYS[1], ARGV[2], ARGV[3])
return 1
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
    "list_jobs": LIST_JOBS,
    "requeue_dead": REQUEUE_DEAD,
    "purge_dead": PURGE_DEAD,
    "fire_schedule": FIRE_SCHEDULE,
    "open_group": OPEN_GROUP,
}
"""Scripts that take the ten keys of one queue and the id index (``enqueue``, ``settle``,
``settle_fetch`` and ``cancel`` may add result keys after them; ``enqueue`` and
``fire_schedule`` take the queue registry as ``KEYS[12]``, and ``fire_schedule`` the schedules
hash as ``KEYS[13]``)."""

SCHEDULE_SCRIPTS: Final = {"schedule_cas": SCHEDULE_CAS}
"""Scripts that take the prefix's schedules hash alone."""

LOOKUP_SCRIPTS: Final = {"job_state": JOB_STATE, "find_job": FIND_JOB}
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
    body = (
        QUEUE_SCRIPTS.get(name)
        or LOOKUP_SCRIPTS.get(name)
        or SCHEDULE_SCRIPTS.get(name)
        or RESULT_SCRIPTS[name]
    )
    head, helpers = _helpers(_PRELUDE)
    needed: set[str] = set()
    text = body
    for helper, block in reversed(helpers):  # a helper only calls helpers defined above it
        if re.search(rf"\b{helper}\(", text):
            needed.add(helper)
            text += block
    kept = [block for helper, block in helpers if helper in needed]
    return "\n\n".join([head, *kept, body] if name in QUEUE_SCRIPTS else [*kept, body])
