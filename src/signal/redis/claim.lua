-- Claim: a socket on this node resumes a session another node holds (the
-- peer was lost there). Checks the token's digest, makes the peer this
-- node's member of its room, and asks the old node to hand it over.
-- KEYS[1]: the session (PREFIX resume:PEER), "DIGEST NODE ROOM".
-- ARGV: peer, digest, this node, prefix, room ttl in ms.
-- Returns the room name, or false when there is no such session here to
-- claim (unknown, used, another digest, or no longer a member).
local v = redis.call('GET', KEYS[1])
if not v then return false end
local digest, node, room = string.match(v, '^(%S+) (%S+) (%S+)$')
if digest ~= ARGV[2] or node == ARGV[3] then return false end
local key = ARGV[4] .. 'room:' .. room
if redis.call('HGET', key, ARGV[1]) ~= node then return false end
redis.call('DEL', KEYS[1])
redis.call('HSET', key, ARGV[1], ARGV[3])
redis.call('PEXPIRE', key, ARGV[5])
redis.call('PUBLISH', ARGV[4] .. 'chan:' .. node,
  '{"kind":"hand-over","peer":"' .. ARGV[1] .. '","to":"' .. ARGV[3] .. '"}')
return room
