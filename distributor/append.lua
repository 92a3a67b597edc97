-- Append a batch of ticks to one stream, idempotently.
-- KEYS[1]  the stream
-- ARGV[1]  MAXLEN ~ cap (0: no cap);  ARGV[2]  MINID age cap in ms (0: none)
-- ARGV[3..] triples: event ms, seq, payload
-- A tick whose seq is at or below the stream's newest seq is already stored: skipped and counted.
-- The ID's ms part is held non-decreasing, so the ID <ms>-<seq> always grows.
-- ms and seq are compared as decimal strings (length, then text): Lua numbers are doubles and
-- lose integers above 2^53, while Redis IDs are 64-bit.
-- Returns {added, duplicates, errors, last seq}.
local function gt(a, b)
  local la, lb = #a, #b
  if la ~= lb then return la > lb end
  return a > b
end

local key = KEYS[1]
local maxlen = tonumber(ARGV[1])
local minage = tonumber(ARGV[2])
local last_ms, last_seq = '0', nil
local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if #top > 0 then
  local id = top[1][1]
  local dash = string.find(id, '-', 1, true)
  last_ms = string.sub(id, 1, dash - 1)
  last_seq = string.sub(id, dash + 1)
end
local added, dups, errors = 0, 0, 0
for i = 3, #ARGV, 3 do
  local seq = ARGV[i + 1]
  if last_seq ~= nil and not gt(seq, last_seq) then
    dups = dups + 1
  else
    local ms = ARGV[i]
    if gt(last_ms, ms) then
      ms = last_ms
    end
    local ok = redis.pcall('XADD', key, ms .. '-' .. seq, 'd', ARGV[i + 2])
    if type(ok) == 'table' and ok.err then
      errors = errors + 1
    else
      added = added + 1
      last_ms, last_seq = ms, seq
    end
  end
end
if added > 0 then
  if maxlen > 0 then
    redis.call('XTRIM', key, 'MAXLEN', '~', maxlen)
  end
  local ms_num = tonumber(last_ms)
  if minage > 0 and ms_num > minage then
    redis.call('XTRIM', key, 'MINID', '~', string.format('%d', ms_num - minage))
  end
end
return {added, dups, errors, last_seq or '-1'}
