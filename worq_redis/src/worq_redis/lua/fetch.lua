-- ARGV: clock, limit, lease seconds, reap limit, promote limit, and optionally the worker
-- whose record of leases the leases join (their tokens then name it; see fetch in helpers.lua).
-- Returns {now, next due time or "", then per job: id, body, token, attempts, cancel (0|1)}.
local now = clock(ARGV[1])
local limit = number_arg(ARGV[2], "limit")
local lease = number_arg(ARGV[3], "lease")
local reap_limit = number_arg(ARGV[4], "reap limit")
local promote_limit = number_arg(ARGV[5], "promote limit")
return fetch(now, limit, lease, reap_limit, promote_limit, ARGV[6])
