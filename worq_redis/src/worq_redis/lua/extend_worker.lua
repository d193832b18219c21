-- Renew every lease in a worker's record of this queue (`held:<worker>`, which fetch keeps):
-- the lease keeper's one call per queue, which needs nothing from the worker per job.
-- ARGV: clock, lease seconds, worker, then pairs (id, progress) of jobs with progress to keep.
-- Returns per renewed lease its token and 1 (held) or 2 (held, and a cancel was requested).
-- Fenced as extend: an entry whose token no longer holds an unexpired lease is not renewed,
-- and it is dropped from the record (leave_lease drops those that leave through a script).
local now = clock(ARGV[1])
local lease = number_arg(ARGV[2], "lease")
local worker = ARGV[3]
if worker == nil or worker == "" or string.find(worker, "|", 1, true) then
  error("worq: bad worker " .. tostring(worker))
end
local progress = {}
for i = 4, #ARGV, 2 do
  progress[ARGV[i]] = ARGV[i + 1]
end
local record = qkey("held:" .. worker)
local until_ = f6(now + lease)
local out = {}
local entries = redis.call("HGETALL", record)
for i = 1, #entries, 2 do
  local id, token = entries[i], entries[i + 1]
  local j = held(id, token, now)
  if j then
    redis.call("ZADD", K_LEASED, until_, id)
    local latest = progress[id]
    if latest then
      redis.call("HSET", K_PROGRESS, id, latest)
      if not has(j, "p") then
        j.fl = j.fl .. "p"
        redis.call("HSET", K_META, id, pack(j))
      end
    end
    out[#out + 1] = token
    out[#out + 1] = has(j, "c") and 2 or 1
  else
    redis.call("HDEL", record, id)
  end
end
return out
