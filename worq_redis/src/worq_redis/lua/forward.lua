-- Under Cluster: messages from outbox entries, added to this queue (KEYS: its keys and id index)
-- unless an entry was applied before.
-- ARGV: clock, how long to remember an applied entry (ms), then per message 11 values: the
-- entry's id, then the 10 message values (see check_message; register and clear record are the
-- broker's business). Per message: enqueue's answer (1 added, 0 id held, or its unique key's
-- holder), or -1 when its entry was applied before (its id is in `applied`, a ZSET of entry
-- ids by the time they were last applied, kept that long).
local now = clock(ARGV[1])
local keep = number_arg(ARGV[2], "keep")
if #ARGV < 13 or (#ARGV - 2) % 11 ~= 0 then
  error("worq: bad argument count")
end
local base = qkey("")
local queue = string.sub(base, #key_prefix() + 3, -3)
for q = 3, #ARGV, 11 do
  check_message(q + 1)
  if ARGV[q + 1] ~= queue then
    error("worq: a message for queue " .. ARGV[q + 1] .. " forwarded to " .. queue)
  end
end
local applied = qkey("applied")
local out = {}
for q = 3, #ARGV, 11 do
  if redis.call("ZSCORE", applied, ARGV[q]) then
    out[#out + 1] = -1
  else
    local m = {unpack(ARGV, q + 1, q + 10)}
    out[#out + 1] = add_job(now, queue, false, m[3], m[4], m[5], m[6], "0", m[8], m[9], m[10])
  end
  -- A repeat too: an entry still being applied (its deletion keeps failing) is remembered for
  -- as long as sweeps keep applying it, not outbox_memory after the first time.
  redis.call("ZADD", applied, f6(now), ARGV[q])
end
redis.call("ZREMRANGEBYSCORE", applied, "-inf", "(" .. f6(now - keep / 1000))
redis.call("PEXPIRE", applied, string.format("%d", keep))
return out
