-- Under Cluster: the broker delivered the callback of the group at KEYS[1]; later repeats of its
-- members' entries no longer return it. Nothing for a released or expired group.
if redis.call("EXISTS", KEYS[1]) == 1 then
  redis.call("HSET", KEYS[1], "fw", "1")
end
return 1
