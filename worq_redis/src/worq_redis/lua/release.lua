-- ARGV: clock, then pairs (id, token). Unstarted jobs go back to ready, their fetch not counted.
local now = clock(ARGV[1])
local any = false
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local j = held(id, ARGV[i + 1], now)
  if j then
    redis.call("ZREM", K_LEASED, id)
    leave_lease(id, j)
    j.at = j.at - 1
    if has(j, "L") and not has(j, "g") then
      j.fl = j.fl .. "g" -- it never ran: the rate slot it took stays granted to it
    end
    to_ready(id, j)
    any = true
  end
end
if any then
  redis.call("ZADD", K_SIGNAL, 0, "ready")
end
return any and 1 or 0
