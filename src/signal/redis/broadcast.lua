-- Broadcast: sends a message to the sender's room-mates on other nodes
-- (those on this node get it without Redis).
-- KEYS[1]: the room (PREFIX room:NAME).
-- ARGV: sender, node, prefix, the message (JSON).
-- Returns 1.
fanout(KEYS[1], ARGV[2], ARGV[1], ARGV[4], ARGV[3])
return 1
