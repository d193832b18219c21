-- KEYS: the schedules hash. ARGV: clock, schedule, tick, last fire ("": no record yet).
-- fire_schedule without a job: the compare-and-set alone, 1 when applied.
number_arg(ARGV[3], "tick")
if (redis.call("HGET", KEYS[1], ARGV[2]) or "") ~= ARGV[4] then
  return 0
end
redis.call("HSET", KEYS[1], ARGV[2], ARGV[3])
return 1
