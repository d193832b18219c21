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
number_arg(ARGV[3], "ttl")
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
if not record_group(gkey) then
  return false
end
local now = clock(ARGV[1])
local out = {}
for q = 17, 16 + 10 * n, 10 do
  out[#out + 1] = send(now, {unpack(ARGV, q, q + 9)})
end
if size == 0 then
  group_complete(now, gkey)
end
return out
