"""Per-key rate limiting: a token bucket kept in Redis, refilled continuously, checked in one script.

Every API replica shares the bucket, so limits hold across a fleet; the check-and-take runs inside the
admission script (services/admission.py), so concurrent requests cannot both spend the last token, and a
submission refused for another reason spends none. Time comes from Redis (``TIME``), not
from the replicas, whose clocks may disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

# A Lua function, shared with the admission script (services/admission.py), which takes a token as one of
# the checks it makes atomically.
TAKE_TOKEN_LUA = """
local function take_token(key, capacity, per_ms)
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local state = redis.call('HMGET', key, 'tokens', 'at')
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
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now_ms))
  redis.call('PEXPIRE', key, math.ceil(capacity / per_ms) + 1000)
  return allowed, wait_ms
end
"""


@dataclass(frozen=True)
class RateLimit:
    """``per_minute`` sustained requests per key, with bursts of up to ``burst``."""

    per_minute: int
    burst: int
    prefix: str = "darkroom:ratelimit:"

    def __post_init__(self) -> None:
        if self.per_minute <= 0 or self.burst <= 0:
            raise ValueError("per_minute and burst must be positive")

    @property
    def capacity(self) -> int:
        return self.burst

    @property
    def per_ms(self) -> float:
        return self.per_minute / 60_000

    def bucket_key(self, principal: str) -> str:
        return self.prefix + principal


def retry_after_s(wait_ms: int) -> int:
    """Whole seconds a refused client should wait: never 0, rounded up."""
    return max(1, -(-int(wait_ms) // 1000))
