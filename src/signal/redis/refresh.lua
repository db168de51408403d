-- Refresh of one room this node has members in: writes them back (Redis
-- may have restarted empty), keeps the room alive, and sweeps the members
-- of dead nodes.
-- KEYS[1]: the room (PREFIX room:NAME).
-- ARGV: node, prefix, room ttl in ms, this node's members...
-- Returns the ids of the members swept.
for i = 4, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return sweep(KEYS[1], ARGV[1], ARGV[2])
