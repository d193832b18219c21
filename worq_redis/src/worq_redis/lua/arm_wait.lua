-- KEYS: result, waiting marker, wake-up list. ARGV: clock, marker ttl ms.
-- The record if there is one; else marks the job as waited on (so its writer pushes a wake-up)
-- and drops a stale wake-up left by a record that has expired since.
local ttl = number_arg(ARGV[2], "ttl")
local record = redis.call("GET", KEYS[1])
if record then
  return record
end
redis.call("DEL", KEYS[3])
redis.call("SET", KEYS[2], "1", "PX", ttl)
return false
