-- Route: publishes an envelope for one recipient on its node's channel.
-- KEYS[1]: the room (PREFIX room:NAME).
-- ARGV: recipient, node, prefix, the envelope (JSON).
-- Returns 1, or 0 when the recipient is not a member on another node.
local n = redis.call('HGET', KEYS[1], ARGV[1])
if not n or n == ARGV[2] then return 0 end
redis.call('PUBLISH', ARGV[3] .. 'chan:' .. n, ARGV[4])
return 1
