-- ARGV: clock, dead max count, dead max age. Retention first, then deletes every dead job left
-- (their ids are free again); returns how many that was.
local now = clock(ARGV[1])
trim_dead(now, number_arg(ARGV[2], "dead max count"), number_arg(ARGV[3], "dead max age"))
local ids = redis.call("ZRANGE", K_DEAD, 0, -1)
for _, id in ipairs(ids) do
  forget(id, nil)
end
redis.call("DEL", K_DEAD)
return #ids
