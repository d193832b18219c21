-- A worker's steady state in one call: settle, then fetch from the same queue.
-- ARGV: clock, dead max count, dead max age, n, then n settlements of 8 values (as in settle),
--   then limit, lease seconds, reap limit, promote limit, worker or "" (as in fetch), then the
--   settlements' workflow blocks, if any (as in settle).
-- Returns {settle flags, fetch reply}. Everything is checked before the first write.
local now = clock(ARGV[1])
local max_count = number_arg(ARGV[2], "dead max count")
local max_age = number_arg(ARGV[3], "dead max age")
local last = 4 + 8 * number_arg(ARGV[4], "count")
local limit = number_arg(ARGV[last + 1], "limit")
local lease = number_arg(ARGV[last + 2], "lease")
local reap_limit = number_arg(ARGV[last + 3], "reap limit")
local promote_limit = number_arg(ARGV[last + 4], "promote limit")
local worker = ARGV[last + 5]
local blocks = check_settlements(5, last, #ARGV > last + 5 and last + 6 or nil)
local flags = apply_settlements(now, 5, last, max_count, max_age, blocks)
return {flags, fetch(now, limit, lease, reap_limit, promote_limit, worker)}
