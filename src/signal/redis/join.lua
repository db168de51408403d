-- Join: one atomic step, so racing joins on several nodes never overfill a
-- room. Sweeps the room's members of dead nodes first; if the room still
-- has room, tells the members on other nodes `peer-joined`, adds the peer
-- and keeps the room alive.
-- KEYS[1]: the room (PREFIX room:NAME).
-- ARGV: peer, node, capacity, room ttl in ms, prefix, the `peer-joined`
-- message (JSON).
-- Returns {joined 0/1, members before (peer, node, ...), dead members swept}.
local dead = sweep(KEYS[1], ARGV[2], ARGV[5])
local m = redis.call('HGETALL', KEYS[1])
if #m / 2 >= tonumber(ARGV[3]) then return {0, m, dead} end
fanout(KEYS[1], ARGV[2], ARGV[1], ARGV[6], ARGV[5])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, m, dead}
