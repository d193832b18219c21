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
