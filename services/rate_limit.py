"""Per-key rate limiting: a token bucket kept in Redis, refilled continuously, checked in one script.

Every API replica shares the bucket, so limits hold across a fleet; the whole check-and-take runs as one Lua
script, so concurrent requests cannot both spend the last token. Time comes from Redis (``TIME``), not
from the replicas, whose clocks may disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

_TAKE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local capacity = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now_ms
tokens = math.min(capacity, tokens + (now_ms - at) * per_ms)
local allowed = 0
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait_ms = math.ceil((1 - tokens) / per_ms)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now_ms))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / per_ms) + 1000)
return {allowed, wait_ms}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int  # whole seconds until a token is available (0 when allowed)


class RateLimiter:
    """``per_minute`` sustained requests per key, with bursts of up to ``burst``."""

    def __init__(
        self, redis: Redis, per_minute: int, burst: int, prefix: str = "darkroom:ratelimit:"
    ) -> None:
        if per_minute <= 0 or burst <= 0:
            raise ValueError("per_minute and burst must be positive")
        self.redis = redis
        self.capacity = burst
        self.per_ms = per_minute / 60_000
        self.prefix = prefix
        self._take = redis.register_script(_TAKE)

    def take(self, key: str) -> Decision:
        allowed, wait_ms = self._take(keys=[self.prefix + key], args=[self.capacity, repr(self.per_ms)])
        return Decision(
            allowed=bool(allowed), retry_after_s=0 if allowed else max(1, -(-int(wait_ms) // 1000))
        )
