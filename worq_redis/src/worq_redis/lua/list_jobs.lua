-- ARGV: which structure (ready | delayed | leased | dead), offset, limit. Read-only.
-- One page in its order (ready: fetch order; delayed, leased: by score; dead: newest first),
-- costing O(log n + offset + limit). Returns per job: id, body, state, attempts, at, reason.
local which = ARGV[1]
local offset = number_arg(ARGV[2], "offset")
local limit = number_arg(ARGV[3], "limit")
local out = {}
if limit <= 0 then
  return out
end
local last = offset + limit - 1
local ids, scores = {}, {}
if which == "ready" then
  for _, m in ipairs(redis.call("ZRANGE", K_READY, offset, last)) do
    ids[#ids + 1] = string.sub(m, 17)
  end
elseif which == "dead" then
  ids = redis.call("ZREVRANGE", K_DEAD, offset, last)
else
  local flat = redis.call("ZRANGE", which == "leased" and K_LEASED or K_DELAYED, offset, last,
    "WITHSCORES")
  for i = 1, #flat, 2 do
    ids[#ids + 1] = flat[i]
    scores[#ids] = flat[i + 1]
  end
end
for i, id in ipairs(ids) do
  local m = redis.call("HGET", K_META, id)
  if m then
    local j = parse(m)
    out[#out + 1] = id
    out[#out + 1] = redis.call("HGET", K_JOBS, id)
    out[#out + 1] = j.st
    out[#out + 1] = j.at
    out[#out + 1] = scores[i] or (j.st == "d" and j.ex) or ""
    out[#out + 1] = redis.call("HGET", K_REASON, id) or ""
  end
end
return out
