-- ARGV: clock, queue, register (0|1), n, then n x (id, body, ready score, eta or "",
--   result key index or 0), then, only when some job is unique or limited, n x (unique spec,
--   limits record), "" for none (see add_job), or, when some job has a workflow record, n x
--   (unique spec, limits record, workflow record).
-- KEYS: the queue's keys and the id index, the queue registry, then the result key of each job
-- whose old record it deletes when it adds the job (Message.clear_record).
-- Per job: 1 if added; 0 when its id is already in the index (in any queue, in any state); the
-- holder's id when its unique key is held in this queue. Jobs are added in order, so a unique
-- job added holds its key for the jobs after it.
-- With register 1 (the broker's first enqueue into the queue), a queue that gets a job is added
-- to the registry, so stats() lists the queues that held a job.
-- A batch of plain jobs costs a handful of calls, not a handful per job: one HMGET of the index
-- finds the ids already held, one INCRBY numbers the new jobs (in order), and HSET/ZADD write
-- them in chunks. A batch with unique or limited jobs adds them one by one (add_job).
local queue, register = ARGV[2], ARGV[3] == "1"
local n = number_arg(ARGV[4], "count")
local specs = 0 -- where the unique specs and limits records start, when there are any
local width = 2 -- specs per job: 3 with workflow records
if #ARGV == 4 + 7 * n and n > 0 then
  specs = 5 + 5 * n
elseif #ARGV == 4 + 8 * n and n > 0 then
  specs, width = 5 + 5 * n, 3
elseif #ARGV ~= 4 + 5 * n then
  error("worq: bad argument count")
end
local timed = false
for i = 0, n - 1 do
  local b = 5 + i * 5
  number_arg(ARGV[b + 2], "priority score")
  if ARGV[b + 3] ~= "" then
    number_arg(ARGV[b + 3], "eta")
    timed = true
  end
  local k = number_arg(ARGV[b + 4], "key index")
  if k ~= 0 and KEYS[k] == nil then
    error("worq: missing result key")
  end
  if specs > 0 then
    check_specs(ARGV[specs + width * i], ARGV[specs + width * i + 1])
    if width == 3 then
      check_wspec(ARGV[specs + 3 * i + 2])
    end
  end
end
local now = 0 -- the clock is read only when some job has an eta
if timed then
  now = clock(ARGV[1])
end
if n == 1 or specs > 0 then
  -- One job (enqueue one by one), or jobs with unique keys or limits: one add_job each, in
  -- order (one plain job makes the direct calls, without the batch's tables).
  local out = {}
  for i = 0, n - 1 do
    local b = 5 + i * 5
    local uspec, lspec, wspec = "", "", nil
    if specs > 0 then
      uspec, lspec = ARGV[specs + width * i], ARGV[specs + width * i + 1]
      if width == 3 then
        wspec = ARGV[specs + 3 * i + 2]
      end
    end
    out[i + 1] = add_job(
      now, queue, register, ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4],
      uspec, lspec, wspec
    )
    if out[i + 1] == 1 then
      register = false
    end
  end
  return out
end
local CHUNK = 1000
local function write(command, key, values)
  for i = 1, #values, CHUNK do
    redis.call(command, key, unpack(values, i, math.min(i + CHUNK - 1, #values)))
  end
end
local out = {}
local fresh = {}
local seen = {}
for i = 0, n - 1, CHUNK do
  local ids = {}
  for k = i, math.min(i + CHUNK, n) - 1 do
    ids[#ids + 1] = ARGV[5 + k * 5]
  end
  local known = redis.call("HMGET", K_IDS, unpack(ids))
  for k = 1, #ids do
    local id = ids[k]
    if known[k] or seen[id] then
      out[i + k] = 0
    else
      seen[id] = true
      out[i + k] = 1
      fresh[#fresh + 1] = i + k - 1
    end
  end
end
if #fresh == 0 then
  return out
end
if register then
  redis.call("SADD", KEYS[12], queue)
end
local seq = redis.call("INCRBY", K_SEQ, #fresh) - #fresh
local index, jobs, meta, ready, delayed, cleared = {}, {}, {}, {}, {}, {}
for _, i in ipairs(fresh) do
  local b = 5 + i * 5
  local id, score, eta = ARGV[b], ARGV[b + 2], ARGV[b + 3]
  seq = seq + 1
  local sq = string.format("%016d", seq)
  index[#index + 1] = id
  index[#index + 1] = queue
  jobs[#jobs + 1] = id
  jobs[#jobs + 1] = ARGV[b + 1]
  meta[#meta + 1] = id
  if eta ~= "" and tonumber(eta) > now then
    meta[#meta + 1] = "s|0|" .. sq .. "|" .. score .. "|"
    delayed[#delayed + 1] = f6(tonumber(eta))
    delayed[#delayed + 1] = id
  else
    meta[#meta + 1] = "q|0|" .. sq .. "|" .. score .. "|"
    ready[#ready + 1] = score
    ready[#ready + 1] = sq .. id
  end
  if ARGV[b + 4] ~= "0" then
    cleared[#cleared + 1] = KEYS[tonumber(ARGV[b + 4])]
  end
end
write("HSET", K_IDS, index)
write("HSET", K_JOBS, jobs)
write("HSET", K_META, meta)
write("ZADD", K_READY, ready)
write("ZADD", K_DELAYED, delayed)
for i = 1, #cleared, CHUNK do
  redis.call("DEL", unpack(cleared, i, math.min(i + CHUNK - 1, #cleared)))
end
if #ready > 0 then
  redis.call("ZADD", K_SIGNAL, 0, "ready")
end
if #delayed > 0 then
  redis.call("ZADD", K_SIGNAL, 0, "due")
end
return out
