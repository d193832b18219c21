-- ARGV: clock, limit. Returns how many expired leases went back to ready.
local now = clock(ARGV[1])
local n = reap(now, number_arg(ARGV[2], "limit"))
if n > 0 then
  redis.call("ZADD", K_SIGNAL, 0, "ready")
end
return n
