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
