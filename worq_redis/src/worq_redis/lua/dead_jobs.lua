-- ARGV: clock, dead max count, dead max age, limit. Newest first: id, body, reason, attempts, died.
local now = clock(ARGV[1])
trim_dead(now, number_arg(ARGV[2], "dead max count"), number_arg(ARGV[3], "dead max age"))
local limit = number_arg(ARGV[4], "limit")
local out = {}
if limit <= 0 then
  return out
end
for _, id in ipairs(redis.call("ZREVRANGE", K_DEAD, 0, limit - 1)) do
  local j = parse(redis.call("HGET", K_META, id))
  out[#out + 1] = id
  out[#out + 1] = redis.call("HGET", K_JOBS, id)
  out[#out + 1] = redis.call("HGET", K_REASON, id) or ""
  out[#out + 1] = j.at
  out[#out + 1] = j.ex
end
return out
