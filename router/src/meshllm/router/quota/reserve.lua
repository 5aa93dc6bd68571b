-- Admit one request against a tenant's limits, atomically: the same steps as ledger.check and
-- ledger.reserve (meshllm/router/quota/ledger.py). A limit of -1 is "unlimited".
-- KEYS: 1 requests bucket (hash), 2 tokens bucket (hash), 3 leases (zset: lease -> expiry),
--       4 this UTC day's token count (string)
-- ARGV: 1 now, 2 requests/min, 3 tokens/min, 4 concurrent, 5 tokens/day, 6 tokens reserved,
--       7 lease id, 8 lease expiry, 9 seconds to the next UTC day, 10 concurrency retry seconds
-- Returns {1, requests level, tokens level} or {0, limit, retry seconds ('' = never), ...}.
local now = tonumber(ARGV[1])
local rpm, tpm, conc, tpd = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tokens = tonumber(ARGV[6])
local MINUTE = 60

local function bucket_at(key, cap)
  local h = redis.call('HMGET', key, 'level', 'updated')
  if not h[1] then return cap, now end
  local level, updated = tonumber(h[1]), tonumber(h[2])
  return math.min(cap, level + math.max(0, now - updated) * cap / MINUTE), math.max(updated, now)
end

local function wait(level, amount, cap)
  return tostring(math.max(0, (amount - level) * MINUTE / cap))
end

local function store(key, cap, level, updated)
  redis.call('HSET', key, 'level', tostring(level), 'updated', tostring(updated))
  -- a full bucket is the same as no key: let it go once it would have refilled
  redis.call('EXPIRE', key, math.ceil((cap - level) * MINUTE / cap) + MINUTE)
end

local out = {0}
local rlevel, rupdated, tlevel, tupdated
if rpm >= 0 then
  rlevel, rupdated = bucket_at(KEYS[1], rpm)
  if rlevel < 1 then
    table.insert(out, 'requests_per_minute'); table.insert(out, wait(rlevel, 1, rpm))
  end
end
if tpm >= 0 then
  tlevel, tupdated = bucket_at(KEYS[2], tpm)
  if tokens > tpm then
    table.insert(out, 'tokens_per_minute'); table.insert(out, '')
  elseif tlevel < tokens then
    table.insert(out, 'tokens_per_minute'); table.insert(out, wait(tlevel, tokens, tpm))
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)  -- leases of a router that died
if conc >= 0 then
  if redis.call('ZCARD', KEYS[3]) >= conc then
    table.insert(out, 'concurrent_requests'); table.insert(out, ARGV[10])
  end
end
if tpd >= 0 then
  local used = tonumber(redis.call('GET', KEYS[4]) or '0')
  if tokens > tpd then
    table.insert(out, 'tokens_per_day'); table.insert(out, '')
  elseif used + tokens > tpd then
    table.insert(out, 'tokens_per_day'); table.insert(out, ARGV[9])
  end
end
if #out > 1 then return out end

if rpm >= 0 then rlevel = rlevel - 1; store(KEYS[1], rpm, rlevel, rupdated) end
if tpm >= 0 then tlevel = tlevel - tokens; store(KEYS[2], tpm, tlevel, tupdated) end
-- every request holds a lease, limited concurrency or not: settling removes it, once
redis.call('ZADD', KEYS[3], tonumber(ARGV[8]), ARGV[7])
-- relative: the caller's clock is the one that counts (an injected one in tests)
redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[8]) - now) + MINUTE, 'GT')
if redis.call('TTL', KEYS[3]) < 0 then
  redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[8]) - now) + MINUTE)
end
if tpd >= 0 then
  redis.call('INCRBY', KEYS[4], tokens)
  redis.call('EXPIRE', KEYS[4], math.ceil(tonumber(ARGV[9])) + 86400)
end
return {1, tostring(rlevel or ''), tostring(tlevel or '')}
