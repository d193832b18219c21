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
