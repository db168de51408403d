-- Functions shared by join.lua, leave.lua, broadcast.lua and refresh.lua,
-- each of which is loaded after this text (scripts.rs joins them).
--
-- fanout(room, self, except, msg, prefix): publishes MSG to every member of
-- the ROOM hash (peer id -> node id) on another node than SELF, except the
-- peer EXCEPT, as one envelope per node on that node's channel,
-- PREFIX chan:NODE. The envelope is concatenated rather than built with
-- cjson, which would turn an empty array in MSG into an object; ids are hex
-- and MSG is JSON that serde wrote, so the result is valid JSON (the shape
-- of `Envelope` in mod.rs).
--
-- sweep(room, self, prefix): removes from ROOM the members of other nodes
-- whose presence key, PREFIX node:NODE, is gone, and returns their ids.
local function fanout(room, self, except, msg, prefix)
  local m = redis.call('HGETALL', room)
  local by = {}
  for i = 1, #m, 2 do
    local p, n = m[i], m[i + 1]
    if p ~= except and n ~= self then
      by[n] = by[n] or {}
      table.insert(by[n], '"' .. p .. '"')
    end
  end
  for n, ids in pairs(by) do
    redis.call('PUBLISH', prefix .. 'chan:' .. n,
      '{"to":[' .. table.concat(ids, ',') .. '],"msg":' .. msg .. '}')
  end
end
local function sweep(room, self, prefix)
  local m = redis.call('HGETALL', room)
  local dead, alive = {}, {}
  for i = 1, #m, 2 do
    local p, n = m[i], m[i + 1]
    if n ~= self then
      if alive[n] == nil then
        alive[n] = redis.call('EXISTS', prefix .. 'node:' .. n)
      end
      if alive[n] == 0 then
        redis.call('HDEL', room, p)
        table.insert(dead, p)
      end
    end
  end
  return dead
end
