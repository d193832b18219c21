-- worq-redis: the key locals and helpers every script starts with.
-- Each script Redis runs is this file followed by the script's own file (worq_redis.lua.source),
-- so a line number in a Redis error up to this file's length is a line of this file, and beyond
-- it that line minus this file's length in the script's file (worq_redis.lua.locate says which).
-- The queue scripts take the ten keys of one queue and the id index as KEYS[1] .. KEYS[11];
-- for the other scripts these locals are unused.
-- How long a result's wake-up list lives, in ms; waiters blocked at that moment are served at once.
local NOTIFY_TTL_MS = 10000
local K_READY, K_DELAYED, K_LEASED, K_JOBS, K_META = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_DEAD, K_SIGNAL, K_SEQ, K_REASON, K_PROGRESS = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local K_IDS = KEYS[11]
local K_REG = false -- the queue registry by name while in_queue() names another queue's keys
-- Values per call of a command that takes many (HSET, ZADD, HMGET, DEL): within what unpack()
-- can put on Lua's stack (8,000).
local CHUNK = 4000

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

-- `command key values[1..count]`, in as few calls as CHUNK allows.
local function write(command, key, values, count)
  for i = 1, count, CHUNK do
    redis.call(command, key, unpack(values, i, math.min(i + CHUNK - 1, count)))
  end
end

-- The values of fields `names[1..count]` of hash `key` (false where none), in as few HMGETs as
-- CHUNK allows.
local function hmget_all(key, names, count)
  if count <= CHUNK then
    return count > 0 and redis.call("HMGET", key, unpack(names, 1, count)) or {}
  end
  local all = {}
  for i = 1, count, CHUNK do
    local part = redis.call("HMGET", key, unpack(names, i, math.min(i + CHUNK - 1, count)))
    for k = 1, #part do
      all[#all + 1] = part[k]
    end
  end
  return all
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

-- A job leaves its lease (settled, released, reaped, cancelled), or a woken job its
-- reservation (cancelled, or set aside for its rate). A lease fetched for a worker (its token
-- `seq@worker`) leaves that worker's record of leases (`held:<worker>`). A job with limits
-- (flag L) gives the permit it holds, if any, back, which wakes the oldest job parked for its key.
local function leave_lease(id, j)
  local at = string.find(j.ex, "@", 1, true)
  if at then
    redis.call("HDEL", qkey("held:" .. string.sub(j.ex, at + 1)), id)
  end
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
    redis.call("PEXPIRE", KEYS[k + 2], NOTIFY_TTL_MS)
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

-- Record a group on `gkey` from open_group's ARGV[2..15] (size, ttl ms, run on failure, has
-- callback, the callback's 10 message values): false, changing nothing, if it is recorded.
local function record_group(gkey)
  if redis.call("EXISTS", gkey) == 1 then
    return false
  end
  local ttl = string.format("%d", math.max(1, tonumber(ARGV[3])))
  local fields = {"size", ARGV[2], "ttl", ttl, "rof", ARGV[4]}
  if ARGV[5] == "1" then
    local names = {"cq", "cr", "ci", "cb", "cs", "ce", "cc", "cu", "cl", "cw"}
    for k = 1, 10 do
      fields[#fields + 1] = names[k]
      fields[#fields + 1] = ARGV[5 + k]
    end
  end
  redis.call("HSET", gkey, unpack(fields))
  return true
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

-- Apply the checked settlement at ARGV[i] (see apply_settlements): 1 if applied, else 0; and
-- whether it dead-lettered its job.
local function settle_one(now, i, blocks)
  local id, outcome = ARGV[i], ARGV[i + 2]
  local block = nil
  if blocks then
    block = blocks[i]
    outcome = string.lower(outcome)
  end
  local j = held(id, ARGV[i + 1], now)
  if j == nil then
    return 0, false
  end
  local died = false
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
  return 1, died
end

-- Acknowledge plain leased jobs (held, no flags) of one call together: `acks` lists their
-- settlement positions in ARGV and parsed metas. Each leaves its lease and is forgotten as
-- forget() forgets a job without flags, one ZREM and one HDEL per structure for them all;
-- their records are written as put_result writes them, with one EXISTS for all their waiters.
local function ack_plain(acks, count)
  local ids, retried, nr = {}, {}, 0
  for a = 1, count do
    local id = ARGV[acks[a].i]
    ids[a] = id
    if acks[a].j.at > 1 then
      nr = nr + 1
      retried[nr] = id -- a job on its first attempt was never retried: it has no reason
    end
  end
  redis.call("ZREM", K_LEASED, unpack(ids, 1, count))
  -- as leave_lease: a lease fetched for a worker leaves that worker's record
  local by_worker = {}
  for a = 1, count do
    local ex = acks[a].j.ex
    local at = string.find(ex, "@", 1, true)
    if at then
      local w = string.sub(ex, at + 1)
      local list = by_worker[w]
      if list == nil then
        list = {}
        by_worker[w] = list
      end
      list[#list + 1] = ids[a]
    end
  end
  for w, list in pairs(by_worker) do
    redis.call("HDEL", qkey("held:" .. w), unpack(list))
  end
  redis.call("HDEL", K_JOBS, unpack(ids, 1, count))
  redis.call("HDEL", K_META, unpack(ids, 1, count))
  redis.call("HDEL", K_IDS, unpack(ids, 1, count))
  if nr > 0 then
    redis.call("HDEL", K_REASON, unpack(retried, 1, nr))
  end
  local markers, nm = {}, 0
  for a = 1, count do
    local i = acks[a].i
    local k = tonumber(ARGV[i + 5])
    if k ~= 0 then
      local ttl = tonumber(ARGV[i + 6])
      if ttl <= 0 then
        redis.call("DEL", KEYS[k])
      else
        redis.call("SET", KEYS[k], ARGV[i + 7], "PX", ttl)
        nm = nm + 1
        markers[nm] = k
      end
    end
  end
  if nm == 0 then
    return
  end
  local names = {}
  for m = 1, nm do
    names[m] = KEYS[markers[m] + 1]
  end
  if redis.call("EXISTS", unpack(names)) > 0 then
    for m = 1, nm do
      local k = markers[m]
      if redis.call("EXISTS", KEYS[k + 1]) == 1 then
        redis.call("DEL", KEYS[k + 1], KEYS[k + 2])
        redis.call("RPUSH", KEYS[k + 2], "1")
        redis.call("PEXPIRE", KEYS[k + 2], NOTIFY_TTL_MS)
      end
    end
  end
end

-- Apply checked settlements ARGV[first .. last]: 1 per applied one, 0 per refused one.
--   id, token, outcome (a|r|d), delay, reason, result key index (0: none), ttl ms, record
-- KEYS[k], KEYS[k+1], KEYS[k+2]: a job's result, waiting marker and wake-up list; the record is
-- written whatever the outcome. A settled job's progress is done with, and so is a requested
-- cancel unless the job is retried (its next delivery then carries the request).
-- `blocks` (from check_settlements): a settlement's workflow block; when it applies, a member's
-- ack or dead counts in its group and releases the group it closes, and its `then` messages
-- are enqueued, all in this step.
-- Several settlements: the plain acks among them (outcome a, no workflow block, an id's first
-- settlement)
-- have their metas and leases read with one HMGET and one ZMSCORE, and those of held jobs
-- without flags are applied together (ack_plain), in runs between the other settlements, which
-- are applied one by one in their places (no settlement sees another's writes out of order).
local function apply_settlements(now, first, last, max_count, max_age, blocks)
  local out = {}
  local died = false
  if last - first < 8 then
    -- one settlement: the calls of one job alone, no batch tables
    if first <= last then
      out[1], died = settle_one(now, first, blocks)
    end
  else
    local ids, at, seen, n = {}, {}, {}, 0
    for i = first, last, 8 do
      local id = ARGV[i]
      if not seen[id] then
        seen[id] = true -- a later settlement of the same id sees the earlier one's writes
        if ARGV[i + 2] == "a" and (blocks == nil or blocks[i] == nil) then
          n = n + 1
          ids[n], at[i] = id, n
        end
      end
    end
    local metas, deadlines = {}, {}
    for c = 1, n, 1000 do
      local e = math.min(c + 999, n)
      local m = redis.call("HMGET", K_META, unpack(ids, c, e))
      local d = redis.call("ZMSCORE", K_LEASED, unpack(ids, c, e))
      for x = c, e do
        metas[x], deadlines[x] = m[x - c + 1], d[x - c + 1]
      end
    end
    local acks, count = {}, 0
    local o = 0
    for i = first, last, 8 do
      o = o + 1
      local x = at[i]
      local j = nil
      if x and metas[x] then
        j = parse(metas[x])
      end
      if x and (j == nil or j.fl == "") then
        -- a plain ack: refused unless its token holds an unexpired lease (held())
        if j and j.st == "l" and j.ex == ARGV[i + 1] and deadlines[x]
          and tonumber(deadlines[x]) > now then
          count = count + 1
          acks[count] = {i = i, j = j}
          out[o] = 1
          if count == 1000 then
            ack_plain(acks, count)
            acks, count = {}, 0
          end
        else
          out[o] = 0
        end
      else
        if count > 0 then
          ack_plain(acks, count)
          acks, count = {}, 0
        end
        local d
        out[o], d = settle_one(now, i, blocks)
        died = died or d
      end
    end
    if count > 0 then
      ack_plain(acks, count)
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

-- A ready job's meta `j` becomes leased under `token` (the caller writes it): one more attempt,
-- and what it held until started let go (its unique key, a granted slot, a reserved permit).
local function take_lease(id, j, token)
  j.at = j.at + 1
  j.st = "l"
  j.ex = token
  if j.fl ~= "" then
    if has(j, "U") then
      unique_release(id, j) -- until started: its first lease lets go of the key
    end
    j.fl = string.gsub(j.fl, "[gk]", "") -- a granted slot, a reserved permit: used up
  end
end

-- Reap and promote (bounded), lease up to `limit` ready jobs, re-arm the wake-up signal.
-- Returns {now, next due time or "", then per job: id, body, token, attempts, cancel (0|1)}.
-- The earliest lease deadline and due time are read first: reaping and promoting run only when
-- one of them has passed, and they give the next due time unless something moved.
-- With a `worker` (not ""), each token is `seq@worker` and the lease is recorded in the
-- worker's record (`held:<worker>`: id -> token) until it leaves (leave_lease), for extend_worker.
local function fetch(now, limit, lease, reap_limit, promote_limit, worker)
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
  local record, holder = nil, ""
  if worker ~= nil and worker ~= "" then
    record, holder = qkey("held:" .. worker), "@" .. worker
  end
  while want > 0 do
    local popped = redis.call("ZPOPMIN", K_READY, want)
    ready_left = #popped >= 2 * want -- fewer than asked: ready is empty now
    local set = 0
    -- A few calls per batch, not per job: a redis.call costs more than most of them do.
    local ids, n = {}, 0
    for i = 1, #popped, 2 do
      n = n + 1
      ids[n] = string.sub(popped[i], 17)
    end
    local metas = hmget_all(K_META, ids, n)
    local taken, jobs, written, t, w = {}, {}, {}, 0, 0
    for k = 1, n do
      local id, m = ids[k], metas[k]
      if m then
        local j = parse(m)
        local aside = nil
        local checked = j.fl ~= "" and has(j, "L")
        if checked then
          aside = admit(id, j, now)
          limited = true
        end
        if aside then
          set = set + 1
          timed = timed or aside > 0
        else
          t = t + 1
          taken[t], jobs[t] = id, j
          if checked then
            -- Leased at once: the permit check of a job behind it in this batch looks for
            -- the leases of the permit's holders (permit_free).
            take_lease(id, j, string.format("%d", redis.call("INCR", K_SEQ)) .. holder)
            redis.call("HSET", K_META, id, pack(j))
            redis.call("ZADD", K_LEASED, until_, id)
            if record then
              redis.call("HSET", record, id, j.ex)
            end
            written[t] = true
            w = w + 1
          end
        end
      end
    end
    if t > 0 then
      -- The others' tokens, in their order (fresh and unique; fencing compares them for
      -- equality only, so a limited job's token drawn above may be the lower).
      local seq = 0
      if t > w then
        seq = redis.call("INCRBY", K_SEQ, t - w) - (t - w)
      end
      local meta, leases, entries, c = {}, {}, {}, 0
      for k = 1, t do
        if not written[k] then
          local id, j = taken[k], jobs[k]
          seq = seq + 1
          take_lease(id, j, string.format("%d", seq) .. holder)
          meta[c + 1], meta[c + 2] = id, pack(j)
          leases[c + 1], leases[c + 2] = until_, id
          entries[c + 1], entries[c + 2] = id, j.ex
          c = c + 2
        end
      end
      write("HSET", K_META, meta, c)
      write("ZADD", K_LEASED, leases, c)
      if record then
        write("HSET", record, entries, c)
      end
      local bodies = hmget_all(K_JOBS, taken, t)
      for k = 1, t do
        local j = jobs[k]
        out[#out + 1] = taken[k]
        out[#out + 1] = bodies[k]
        out[#out + 1] = j.ex
        out[#out + 1] = j.at
        out[#out + 1] = has(j, "c") and 1 or 0
      end
      got = got + t
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
