-- KEYS: result, waiting marker, wake-up list. ARGV: clock, ttl ms, record.
local ttl = number_arg(ARGV[2], "ttl")
put_result(1, ttl, ARGV[3])
return 1
