-- ARGV: clock, dead max count, dead max age, then per settlement 8 values:
--   id, token, outcome (a|r|d), delay, reason, result key index (0: none), ttl ms, record
-- KEYS[k], KEYS[k+1], KEYS[k+2]: a job's result, waiting marker and wake-up list.
-- With workflow blocks (outcomes in capitals), they follow the settlements, and the last value
-- is where they start (padded so that the count of values after the first three is no multiple
-- of 8): a plain call sends exactly what it always sent.
local now = clock(ARGV[1])
local max_count = number_arg(ARGV[2], "dead max count")
local max_age = number_arg(ARGV[3], "dead max age")
local last, extras = #ARGV, nil
if (#ARGV - 3) % 8 ~= 0 then
  extras = number_arg(ARGV[#ARGV], "workflow blocks")
  last = extras - 1
end
local blocks = check_settlements(4, last, extras)
return apply_settlements(now, 4, last, max_count, max_age, blocks)
