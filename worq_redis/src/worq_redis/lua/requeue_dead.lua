-- ARGV: clock, dead max count, dead max age, "all" or "ids", then ids.
-- Retention first (a job past it is gone, not requeued); then dead jobs go to the back of
-- ready, attempts reset.
local now = clock(ARGV[1])
trim_dead(now, number_arg(ARGV[2], "dead max count"), number_arg(ARGV[3], "dead max age"))
local ids
if ARGV[4] == "all" then
  ids = redis.call("ZRANGE", K_DEAD, 0, -1)
else
  ids = {}
  for i = 5, #ARGV do
    ids[#ids + 1] = ARGV[i]
  end
end
local n = 0
for _, id in ipairs(ids) do
  if redis.call("ZREM", K_DEAD, id) == 1 then
    local j = parse(redis.call("HGET", K_META, id))
    j.at = 0
    j.sq = next_seq()
    redis.call("HDEL", K_REASON, id)
    to_ready(id, j)
    n = n + 1
  end
end
if n > 0 then
  redis.call("ZADD", K_SIGNAL, 0, "ready")
end
return n
