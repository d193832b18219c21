-- One plain job, enqueued one by one: what enqueue's add_job does for a job with no eta, no
-- unique key, limits, workflow record or record to clear, into a queue already registered.
-- KEYS: the queue's ready, jobs, meta, signal and seq, then the id index (not the ten keys the
-- queue scripts take: half the arguments to hand over, and none of the helpers' K_ locals used).
-- ARGV: queue, id, body, ready score. Returns {1} if added, {0} if the id is held anywhere.
local ready, jobs, meta, signal, seq, ids = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local queue, id, score = ARGV[1], ARGV[2], ARGV[4]
if tonumber(score) == nil then
  error("worq: bad priority score: " .. tostring(score))
end
if redis.call("HSETNX", ids, id, queue) == 0 then
  return {0}
end
local sq = string.format("%016d", redis.call("INCR", seq))
redis.call("HSET", jobs, id, ARGV[3])
redis.call("HSET", meta, id, "q|0|" .. sq .. "|" .. score .. "|")
redis.call("ZADD", ready, score, sq .. id)
redis.call("ZADD", signal, 0, "ready")
return {1}
