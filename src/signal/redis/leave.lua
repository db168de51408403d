-- Leave: removes the peer if it is a member on this node, and tells the
-- members on other nodes `peer-left`.
-- KEYS[1]: the room (PREFIX room:NAME).
-- ARGV: peer, node, prefix, the `peer-left` message (JSON).
-- Returns 1, or 0 when the peer was not this node's member there.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
fanout(KEYS[1], ARGV[2], ARGV[1], ARGV[4], ARGV[3])
return 1
