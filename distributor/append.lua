-- Append a batch of ticks to one stream, idempotently.
-- KEYS[1]  the stream
-- ARGV[1]  MAXLEN ~ cap (0: no cap);  ARGV[2]  MINID age cap in ms (0: none)
-- ARGV[3]  the batch: records "<ms>-<seq> <payload>\n", oldest first (payloads are JSON, which
--          never holds a raw newline).  One argument for the whole batch keeps the client's
--          encoding cost off the per-tick path.
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
local blob = ARGV[3]
local last_ms, last_seq = '0', nil
local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if #top > 0 then
  local id = top[1][1]
  local dash = string.find(id, '-', 1, true)
  last_ms = string.sub(id, 1, dash - 1)
  last_seq = string.sub(id, dash + 1)
end
local added, dups, errors = 0, 0, 0
local pos, n = 1, #blob
local find, sub = string.find, string.sub
while pos <= n do
  local dash = find(blob, '-', pos, true)
  local space = find(blob, ' ', dash, true)
  local nl = find(blob, '\n', space, true)
  local ms = sub(blob, pos, dash - 1)
  local seq = sub(blob, dash + 1, space - 1)
  if last_seq ~= nil and not gt(seq, last_seq) then
    dups = dups + 1
  else
    if gt(last_ms, ms) then
      ms = last_ms
    end
    local ok = redis.pcall('XADD', key, ms .. '-' .. seq, 'd', sub(blob, space + 1, nl - 1))
    if type(ok) == 'table' and ok.err then
      errors = errors + 1
    else
      added = added + 1
      last_ms, last_seq = ms, seq
    end
  end
  pos = nl + 1
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
