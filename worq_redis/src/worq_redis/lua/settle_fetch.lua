-- A worker's steady state in one call: settle, then fetch from the same queue.
-- ARGV: clock, dead max count, dead max age, n, then n settlements of 8 values (as in settle),
--   then limit, lease seconds, reap limit, promote limit (as in fetch), then the worker the
--   leases are recorded for (as in fetch) and the settlements' workflow blocks (as in settle).
--   A call with blocks (outcomes in capitals) always sends the worker, "" for none; one without
--   sends it only when there is one, so a plain call sends what it always sent.
-- Returns {settle flags, fetch reply}. Everything is checked before the first write.
local now = clock(ARGV[1])
local max_count = number_arg(ARGV[2], "dead max count")
local max_age = number_arg(ARGV[3], "dead max age")
local last = 4 + 8 * number_arg(ARGV[4], "count")
local limit = number_arg(ARGV[last + 1], "limit")
local lease = number_arg(ARGV[last + 2], "lease")
local reap_limit = number_arg(ARGV[last + 3], "reap limit")
local promote_limit = number_arg(ARGV[last + 4], "promote limit")
local worker, extras = ARGV[last + 5], nil
for i = 7, last, 8 do
  if string.find(ARGV[i], "^%u") then
    extras = last + 6
  end
end
local blocks = check_settlements(5, last, extras)
local flags = apply_settlements(now, 5, last, max_count, max_age, blocks)
return {flags, fetch(now, limit, lease, reap_limit, promote_limit, worker)}
