-- Under Cluster, open_group's first step, on the group's key alone (KEYS[1]); the broker then
-- enqueues the members, each in its own queue's slot.
-- ARGV: clock, size, ttl ms, run on failure (0|1), has callback (0|1), the callback's 10 message
-- values (see check_message; empty when none).
-- false when the group is already recorded (nothing changes); else the group is recorded, and
-- a group of size 0 is complete at once: then its callback's 10 values if it is due, else {}.
local gkey = KEYS[1]
local size = number_arg(ARGV[2], "size")
number_arg(ARGV[3], "ttl")
local cb = ARGV[5] == "1"
if #ARGV ~= 15 then
  error("worq: bad argument count")
end
if cb then
  check_message(6)
end
if not record_group(gkey) then
  return false
end
if size == 0 then
  group_done(gkey)
  return group_callback(gkey) or {}
end
return {}
