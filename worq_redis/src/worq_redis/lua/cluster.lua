-- worq-redis under Redis Cluster: helpers that replace their namesakes in helpers.lua, and the
-- outbox (worq_redis.lua.source merges the two files). A script touches one slot, its queue's
-- (or its group's): an effect on another slot (a `then` message for another queue, a group
-- member counted, a group released) is appended to the queue's outbox in the same step, and the
-- broker applies it in its own slot right after, or a sweep does later (docs/redis.md).
-- The outbox entries this call appended, returned with the script's reply (cluster_reply).
local OUTBOX_NEW = {}

-- Values (strings) as one netstring list: each its length, a colon, then its bytes. How an
-- outbox entry is written; worq_redis.broker reads it back.
local function netstrings(values)
  local parts = {}
  for i = 1, #values do
    parts[i] = #values[i] .. ":" .. values[i]
  end
  return table.concat(parts)
end

-- Append an effect on another slot to this queue's outbox (`outbox`, a ZSET of entries scored
-- by the time they were added): `values` are its kind ("m" a message to enqueue, "c" a group
-- member to count, "x" a group to release) and its data; the entry's id goes second: this
-- queue's tag, a number of its `seq` and the time, unique for good, so the slot that applies it
-- can tell a repeat. The time because `seq` alone may go back: a failover to a replica that
-- missed the last writes would number a new entry as one already applied, and drop it.
-- Never called while in_queue points the queue locals at another queue.
local function outbox_add(now, values)
  if now == 0 then
    now = clock(ARGV[1]) -- fire_schedule reads the clock only for a job with an eta
  end
  local tag = string.sub(qkey(""), #key_prefix() + 2)
  table.insert(values, 2, tag .. redis.call("INCR", K_SEQ) .. "@" .. f6(now))
  local entry = netstrings(values)
  redis.call("ZADD", qkey("outbox"), f6(now), entry)
  OUTBOX_NEW[#OUTBOX_NEW + 1] = entry
end

-- Enqueue message `m` (the 10 values check_message checks). Under Cluster a message for this
-- very queue (the broker says so with register "1"; it never has a record to clear) is added
-- here as enqueue adds it: 1, 0 (id held) or its unique key's holder. Any other goes to the
-- outbox, to be added in its own queue's slot: 0 (not added yet).
local function send(now, m)
  if m[2] == "1" then
    return add_job(now, m[1], false, m[3], m[4], m[5], m[6], "0", m[8], m[9], m[10])
  end
  outbox_add(now, {"m", unpack(m)})
  return 0
end

-- A job with a workflow record ended (acknowledged, dead, removed by cancel): under Cluster its
-- count in its group ("c": group, index, status, output flag, output) and the release of the
-- group it closes ("x": group) go to the outbox, in that order.
local function workflow_end(now, record, status, output)
  local w = workflow_of(record)
  if w.index then
    local flag = output and "1" or "0"
    outbox_add(now, {"c", w.group, string.format("%d", w.index), status, flag, output or ""})
  end
  if w.closes ~= "" then
    outbox_add(now, {"x", w.closes})
  end
end

-- The step that counted a group's last index (KEYS[1] of a group script): mark it complete,
-- say whether its callback is due (complete with no failure, or run-on-failure), and let the
-- state expire after its ttl. The callback itself is sent by the broker (group_callback).
local function group_done(gkey)
  local g = redis.call("HMGET", gkey, "ttl", "rof", "nf", "ci")
  local sent = g[4] and (not g[3] or g[2] == "1")
  redis.call("HSET", gkey, "done", "1", "sent", sent and "1" or "0")
  redis.call("PEXPIRE", gkey, g[1])
end

-- The 10 message values of group `gkey`'s callback while it is due (complete, sent) and its
-- delivery not yet confirmed (`fw`, by group_sent); else false.
local function group_callback(gkey)
  local g = redis.call(
    "HMGET", gkey, "done", "sent", "fw", "cq", "cr", "ci", "cb", "cs", "ce", "cc", "cu", "cl", "cw"
  )
  if g[1] ~= "1" or g[2] ~= "1" or g[3] then
    return false
  end
  return {unpack(g, 4, 13)}
end

-- A script's reply under Cluster: the reply and the outbox entries the call added.
local function cluster_reply(reply)
  return {reply, OUTBOX_NEW}
end
