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
