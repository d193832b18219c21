-- ARGV: clock, dead max count, dead max age. Returns {ready, delayed, running, dead}.
-- Parked jobs (waiting for a permit) count as ready, jobs waiting for their rate slot as delayed.
local now = clock(ARGV[1])
trim_dead(now, number_arg(ARGV[2], "dead max count"), number_arg(ARGV[3], "dead max age"))
local due = redis.call("ZCOUNT", K_DELAYED, "-inf", f6(now))
local expired = redis.call("ZCOUNT", K_LEASED, "-inf", f6(now))
return {
  redis.call("ZCARD", K_READY) + due + expired + redis.call("HLEN", qkey("aside")),
  redis.call("ZCARD", K_DELAYED) - due,
  redis.call("ZCARD", K_LEASED) - expired,
  redis.call("ZCARD", K_DEAD),
}
