#!lua
-- Append batches of ticks to one or more streams, idempotently.
-- The shebang (Redis 7.0+) declares a script that writes and may not run out of memory: Redis
-- refuses the whole call with OOM before its first command when it is over maxmemory, and with
-- READONLY on a replica, so a refused call has written nothing.
-- KEYS: the streams.  ARGV[1]: one section per key, in KEYS order, each a header line
-- "<maxlen> <minage> <after> <top> <size>\n" (MAXLEN ~ cap, 0: none; MINID age cap in ms, 0: none; the seq
-- of the last tick of this stream the writer sent in an earlier call that may not have run yet, "-":
-- none; the stream's newest ID as this writer's own last call of it left it, "-": not known; the size
-- in bytes of what follows) and then its records "<ms>-<seq> <payload>\n", oldest first
-- (payloads are JSON, which never holds a raw newline).  One argument for the whole call keeps the client's
-- command encoding off the per-stream and per-tick path.  The writer passes several keys in one call
-- only where they share a hash slot (all of them on a standalone Redis), so a call never spans two
-- slots of a Redis Cluster.
-- A tick whose seq is at or below the stream's newest seq is already stored: skipped and counted.
-- The newest entry is read (XREVRANGE, the costliest call here) only when <top> is "-".  A given <top>
-- is trusted until Redis says otherwise: if another writer stored more since, XADD refuses an ID at or
-- below the stream's real top, and the section goes on from the newest entry read then, so nothing is
-- stored twice or out of order.
-- With <after>, the section is refused whole ("ORDER ...", nothing tried) unless the stream holds that
-- seq or a newer one: a writer with several calls in flight on one connection never stores a stream's
-- later ticks while earlier ones it sent were refused (OOM, NOSCRIPT, an ID ...), which the
-- duplicate rule would then skip for good; it sends them again, in order, once it has the replies.
-- The ID's ms part is held non-decreasing, so the ID <ms>-<seq> always grows.
-- ms and seq are compared as decimal strings (length, then text): Lua numbers are doubles and
-- lose integers above 2^53, while Redis IDs are 64-bit.
-- An error reply (WRONGTYPE on the key, an ID Redis refuses, OOM ...) stops that stream at the
-- failing tick; the other streams go on.  Everything before the failing tick is settled (stored or
-- skipped as a duplicate), nothing after it was tried.
-- Returns, per stream, {added, duplicates, error, top} flattened: error is false when the stream's
-- whole section was settled, else the error reply's text, and the failing tick is then the
-- (added + duplicates + 1)-th record of the section; top is the stream's newest ID "<ms>-<seq>" as
-- this call leaves it when the section was settled (false when not, or when the stream is empty).
local function gt(a, b)
  local la, lb = #a, #b
  if la ~= lb then return la > lb end
  return a > b
end

local find, sub = string.find, string.sub

-- The stream's newest entry: error (false when none), its ms and seq ('0', nil when the stream is empty).
local function newest(key)
  local top = redis.pcall('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if top.err then
    return top.err, '0', nil
  elseif #top > 0 then
    local id = top[1][1]
    local dash = find(id, '-', 1, true)
    return false, sub(id, 1, dash - 1), sub(id, dash + 1)
  end
  return false, '0', nil
end
local out = {}
local blob = ARGV[1]
local at = 1
for k = 1, #KEYS do
  local key = KEYS[k]
  local s1 = find(blob, ' ', at, true)
  local s2 = find(blob, ' ', s1 + 1, true)
  local s3 = find(blob, ' ', s2 + 1, true)
  local s4 = find(blob, ' ', s3 + 1, true)
  local eol = find(blob, '\n', s4 + 1, true)
  local maxlen = tonumber(sub(blob, at, s1 - 1))
  local minage = tonumber(sub(blob, s1 + 1, s2 - 1))
  local after = sub(blob, s2 + 1, s3 - 1)
  local known = sub(blob, s3 + 1, s4 - 1)
  local n = eol + tonumber(sub(blob, s4 + 1, eol - 1))
  at = n + 1
  local added, dups, err, trimmed = 0, 0, false, false
  local last_ms, last_seq = '0', nil
  if known ~= '-' then
    local dash = find(known, '-', 1, true)
    last_ms = sub(known, 1, dash - 1)
    last_seq = sub(known, dash + 1)
  else
    err, last_ms, last_seq = newest(key)
  end
  if not err and after ~= '-' and (last_seq == nil or gt(after, last_seq)) then
    err = 'ORDER ' .. key .. ' holds seq ' .. (last_seq or 'none') .. ', below ' .. after .. ' sent before'
  end
  local pos = eol + 1
  while not err and pos <= n do
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
      local ok
      if maxlen > 0 and nl >= n then  -- the section's last record: the MAXLEN trim rides on its XADD
        ok = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, ms .. '-' .. seq, 'd', sub(blob, space + 1, nl - 1))
        trimmed = true
      else
        ok = redis.pcall('XADD', key, ms .. '-' .. seq, 'd', sub(blob, space + 1, nl - 1))
      end
      if type(ok) == 'table' and ok.err then
        trimmed = false
        if known ~= '-' and find(ok.err, 'equal or smaller', 1, true) then
          -- the given top was behind the stream (another writer stored more): read the real one and
          -- take this record again against it
          known = '-'
          err, last_ms, last_seq = newest(key)
          nl = pos - 1
        else
          err = ok.err
        end
      else
        added = added + 1
        last_ms, last_seq = ms, seq
      end
    end
    pos = nl + 1
  end
  if added > 0 then
    if maxlen > 0 and not trimmed then
      redis.call('XTRIM', key, 'MAXLEN', '~', maxlen)
    end
    local ms_num = tonumber(last_ms)
    if minage > 0 and ms_num > minage then
      redis.call('XTRIM', key, 'MINID', '~', string.format('%d', ms_num - minage))
    end
  end
  out[#out + 1] = added
  out[#out + 1] = dups
  out[#out + 1] = err
  out[#out + 1] = (not err and last_seq ~= nil) and (last_ms .. '-' .. last_seq)
end
return out
