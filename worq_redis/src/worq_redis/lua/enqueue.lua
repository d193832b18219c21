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
-- finds the ids already held, one INCRBY numbers the new jobs (in order), and one HSET or ZADD per
-- structure writes them (up to 2,000 jobs a call). A batch with unique or limited jobs adds them
-- one by one (add_job).
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
for b = 5, 4 + 5 * n, 5 do
  number_arg(ARGV[b + 2], "priority score")
  if ARGV[b + 3] ~= "" then
    number_arg(ARGV[b + 3], "eta")
    timed = true
  end
  if ARGV[b + 4] ~= "0" then
    local k = number_arg(ARGV[b + 4], "key index")
    if k ~= 0 and KEYS[k] == nil then
      error("worq: missing result key")
    end
  end
  if specs > 0 then
    local s = specs + width * (b - 5) / 5
    check_specs(ARGV[s], ARGV[s + 1])
    if width == 3 then
      check_wspec(ARGV[s + 2])
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
local out, fresh, seen, nf = {}, {}, {}, 0
for i = 0, n - 1, CHUNK do
  local last = math.min(i + CHUNK, n) - 1
  local ids = {}
  for k = i, last do
    ids[k - i + 1] = ARGV[5 + k * 5]
  end
  local known = redis.call("HMGET", K_IDS, unpack(ids))
  for k = i, last do
    local id = ids[k - i + 1]
    if known[k - i + 1] or seen[id] then
      out[k + 1] = 0
    else
      seen[id] = true
      out[k + 1] = 1
      nf = nf + 1
      fresh[nf] = 5 + k * 5
    end
  end
end
if nf == 0 then
  return out
end
if register then
  redis.call("SADD", KEYS[12], queue)
end
-- Each new job: its id in the index, its body, its meta, and its place in ready (or delayed).
-- The tables are filled by counters (a `#t` per append walks the table).
local seq = redis.call("INCRBY", K_SEQ, nf) - nf
local index, jobs, meta, ready, delayed, cleared = {}, {}, {}, {}, {}, {}
local w, r, d, c = 0, 0, 0, 0
for f = 1, nf do
  local b = fresh[f]
  local id, score, eta = ARGV[b], ARGV[b + 2], ARGV[b + 3]
  local sq = string.format("%016d", seq + f)
  w = w + 2
  index[w - 1], index[w] = id, queue
  jobs[w - 1], jobs[w] = id, ARGV[b + 1]
  meta[w - 1] = id
  if eta ~= "" and tonumber(eta) > now then
    meta[w] = "s|0|" .. sq .. "|" .. score .. "|"
    delayed[d + 1], delayed[d + 2] = f6(tonumber(eta)), id
    d = d + 2
  else
    meta[w] = "q|0|" .. sq .. "|" .. score .. "|"
    ready[r + 1], ready[r + 2] = score, sq .. id
    r = r + 2
  end
  if ARGV[b + 4] ~= "0" then
    c = c + 1
    cleared[c] = KEYS[tonumber(ARGV[b + 4])]
  end
end
write("HSET", K_IDS, index, w)
write("HSET", K_JOBS, jobs, w)
write("HSET", K_META, meta, w)
write("ZADD", K_READY, ready, r)
write("ZADD", K_DELAYED, delayed, d)
for i = 1, c, CHUNK do
  redis.call("DEL", unpack(cleared, i, math.min(i + CHUNK - 1, c)))
end
if r > 0 then
  redis.call("ZADD", K_SIGNAL, 0, "ready")
end
if d > 0 then
  redis.call("ZADD", K_SIGNAL, 0, "due")
end
return out
