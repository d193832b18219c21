-- ARGV: clock, lease seconds, then per lease 4 values: id, token, has progress (0|1), progress.
-- Returns per lease 0 (lost), 1 (held) or 2 (held, and a cancel was requested). A held lease's
-- progress is kept in the queue's progress hash until the job leaves its lease.
local now = clock(ARGV[1])
local lease = number_arg(ARGV[2], "lease")
for i = 3, #ARGV, 4 do
  local flag = ARGV[i + 2]
  if flag ~= "0" and flag ~= "1" then
    error("worq: bad progress flag " .. tostring(flag))
  end
end
local until_ = f6(now + lease)
local out = {}
for i = 3, #ARGV, 4 do
  local id = ARGV[i]
  local j = held(id, ARGV[i + 1], now)
  if j then
    redis.call("ZADD", K_LEASED, until_, id)
    if ARGV[i + 2] == "1" then
      redis.call("HSET", K_PROGRESS, id, ARGV[i + 3])
      if not has(j, "p") then
        j.fl = j.fl .. "p"
        redis.call("HSET", K_META, id, pack(j))
      end
    end
    out[#out + 1] = has(j, "c") and 2 or 1
  else
    out[#out + 1] = 0
  end
end
return out
