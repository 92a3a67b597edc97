-- Append a batch of ticks to one stream, idempotently.
-- KEYS[1]  the stream
-- ARGV[1]  MAXLEN ~ cap (0: no cap);  ARGV[2]  MINID age cap in ms (0: none)
-- ARGV[3..] triples: event ms, seq, payload
-- A tick whose seq is at or below the stream's newest seq is already stored: skipped and counted.
-- The ID's ms part is held non-decreasing, so the ID <ms>-<seq> always grows.
-- Returns {added, duplicates, errors, last seq}.
local key = KEYS[1]
local maxlen = tonumber(ARGV[1])
local minage = tonumber(ARGV[2])
local last_ms_s, last_ms, last_seq = '0', 0, -1
local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if #top > 0 then
  local id = top[1][1]
  local dash = string.find(id, '-', 1, true)
  last_ms_s = string.sub(id, 1, dash - 1)
  last_ms = tonumber(last_ms_s)
  last_seq = tonumber(string.sub(id, dash + 1))
end
local added, dups, errors = 0, 0, 0
for i = 3, #ARGV, 3 do
  local seq = tonumber(ARGV[i + 1])
  if seq <= last_seq then
    dups = dups + 1
  else
    local ms_s = ARGV[i]
    local ms = tonumber(ms_s)
    if ms < last_ms then
      ms_s = last_ms_s
      ms = last_ms
    end
    local ok = redis.pcall('XADD', key, ms_s .. '-' .. ARGV[i + 1], 'd', ARGV[i + 2])
    if type(ok) == 'table' and ok.err then
      errors = errors + 1
    else
      added = added + 1
      last_ms_s, last_ms, last_seq = ms_s, ms, seq
    end
  end
end
if added > 0 then
  if maxlen > 0 then
    redis.call('XTRIM', key, 'MAXLEN', '~', maxlen)
  end
  if minage > 0 and last_ms > minage then
    redis.call('XTRIM', key, 'MINID', '~', tostring(last_ms - minage))
  end
end
return {added, dups, errors, last_seq}
