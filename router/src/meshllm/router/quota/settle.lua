-- End one reservation: the same steps as ledger.settle (meshllm/router/quota/ledger.py);
-- a lease already settled (or expired) changes nothing.
-- KEYS: 1 tokens bucket (hash), 2 leases (zset), 3 the reservation day's token count
-- ARGV: 1 now, 2 tokens/min (-1: unlimited), 3 refund (reserved - used; may be negative),
--       4 lease id, 5 1 when the reservation was made today (else its day stays as it was)
local now, tpm, refund = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local MINUTE = 60
-- once only: a settle sent again after a timeout (Redis may have run the first) changes nothing
if redis.call('ZREM', KEYS[2], ARGV[4]) == 0 then return 0 end
if tpm >= 0 then
  local h = redis.call('HMGET', KEYS[1], 'level', 'updated')
  local level, updated = tpm, now
  if h[1] then
    level = math.min(tpm, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * tpm / MINUTE)
    updated = math.max(tonumber(h[2]), now)
  end
  level = math.min(tpm, level + refund)
  redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', tostring(updated))
  redis.call('EXPIRE', KEYS[1], math.ceil((tpm - level) * MINUTE / tpm) + MINUTE)
end
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('DECRBY', KEYS[3], refund) < 0 then redis.call('SET', KEYS[3], 0, 'KEEPTTL') end
end
return 1
