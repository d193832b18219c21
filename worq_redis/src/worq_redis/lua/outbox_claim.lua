-- Under Cluster: the sweep's share of a queue's outbox (KEYS[1]). ARGV: clock, age (seconds),
-- limit. Up to `limit` entries added at least `age` seconds ago (their forwarder died, or could
-- not reach the target), each re-scored to now, so that another sweep leaves them alone for
-- `age` seconds while this one forwards them.
local now = clock(ARGV[1])
local age = number_arg(ARGV[2], "age")
local limit = number_arg(ARGV[3], "limit")
local entries = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", f6(now - age), "LIMIT", 0, limit)
for _, entry in ipairs(entries) do
  redis.call("ZADD", KEYS[1], "XX", f6(now), entry)
end
return entries
