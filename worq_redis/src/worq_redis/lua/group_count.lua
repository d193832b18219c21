-- Under Cluster: group members counted from outbox entries, on the group's key alone (KEYS[1]).
-- ARGV: 4 values per member: index, status (a acknowledged, d dead, c cancelled), output flag
-- (0|1), output. Each index counts once (a repeated entry changes nothing); the step that counts
-- the last one marks the group complete (group_done). Returns the callback's 10 message values
-- while it is due and its delivery not yet confirmed, so a repeated entry after a crash sends
-- it again (its queue's `applied` tells the repeat); false otherwise, and for an unknown or
-- released group.
if #ARGV == 0 or #ARGV % 4 ~= 0 then
  error("worq: bad argument count")
end
for i = 1, #ARGV, 4 do
  number_arg(ARGV[i], "index")
  if ARGV[i + 1] ~= "a" and ARGV[i + 1] ~= "d" and ARGV[i + 1] ~= "c" then
    error("worq: bad status " .. ARGV[i + 1])
  end
end
local gkey = KEYS[1]
local size = tonumber(redis.call("HGET", gkey, "size"))
if size == nil then
  return false
end
for i = 1, #ARGV, 4 do
  local index, status = tonumber(ARGV[i]), ARGV[i + 1]
  if index < size then
    local value = ARGV[i + 2] == "1" and (status .. "=" .. ARGV[i + 3]) or (status .. "-")
    if redis.call("HSETNX", gkey, "i:" .. index, value) == 1 then
      if status ~= "a" then
        redis.call("HINCRBY", gkey, "nf", 1)
      end
      if redis.call("HINCRBY", gkey, "n", 1) == size then
        group_done(gkey)
      end
    end
  end
end
return group_callback(gkey)
