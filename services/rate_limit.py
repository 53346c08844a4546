"""Per-key rate limiting: token buckets kept in Redis, refilled continuously, checked in one script.

Every API replica shares the buckets, so limits hold across a fleet; each check-and-take is one script,
so concurrent requests cannot both spend the last token. Time comes from Redis (``TIME``), not from the
replicas, whose clocks may disagree. A key has three buckets (docs/operate/reliability.md, "Tenant
isolation"):

- **submissions** (``DARKROOM_RATE_LIMIT_*``): one token per ``POST`` that submits, taken *before* the
  body is validated (:class:`TokenGate`, a route dependency), so a client looping invalid or expensive
  requests is limited like any other; given back when the submission turns out to be an
  ``Idempotency-Key`` replay or meets a full queue (it made nothing);
- **batch items** (``DARKROOM_BATCH_ITEMS_*``): a batch spends tokens in proportion to what it stores,
  inside its admission script (services/admission.py), atomically with the queue checks;
- **reads** (``DARKROOM_READ_RATE_LIMIT_*``): one token per ``GET`` of jobs and batches, a separate and
  generous bucket, so polling never starves submissions and a read loop cannot take the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis
from redis.asyncio.client import Pipeline

# A Lua function, shared with the admission script (services/admission.py), which takes a token as one of
# the checks it makes atomically.
TAKE_TOKEN_LUA = """
local function take_token(key, capacity, per_ms, cost)
  cost = cost or 1
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(state[1]) or capacity
  local at = tonumber(state[2]) or now_ms
  tokens = math.min(capacity, tokens + (now_ms - at) * per_ms)
  local allowed = 0
  local wait_ms = 0
  if tokens >= cost then
    tokens = tokens - cost
    allowed = 1
  else
    wait_ms = math.ceil((cost - tokens) / per_ms)
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


READ_BUCKETS = "darkroom:ratelimit:read:"
BATCH_BUCKETS = "darkroom:ratelimit:batch:"

_TAKE = (
    TAKE_TOKEN_LUA
    + """
-- KEYS: 1 bucket; ARGV: 1 capacity, 2 tokens per ms, 3 cost. Returns {allowed, wait ms}.
local allowed, wait_ms = take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
return {allowed, wait_ms}
"""
)

_GIVE_BACK = """
-- KEYS: 1 bucket; ARGV: 1 capacity, 2 tokens. Returns tokens to a bucket that still exists, up to its
-- capacity (a bucket that expired is full already).
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
if not tokens then return 0 end
redis.call('HSET', KEYS[1], 'tokens', tostring(math.min(tonumber(ARGV[1]), tokens + tonumber(ARGV[2]))))
return 1
"""


class TokenGate:
    """One bucket per key, taken from and given back to on the API's async Redis client."""

    def __init__(self, redis: aredis.Redis, limit: RateLimit) -> None:
        self.limit = limit
        self._take: Any = redis.register_script(_TAKE)
        self._give_back: Any = redis.register_script(_GIVE_BACK)

    async def take(self, principal: str, cost: int = 1) -> int:
        """0 when ``cost`` tokens were taken; otherwise the milliseconds until they would be there."""
        limit = self.limit
        reply = await self._take(
            keys=[limit.bucket_key(principal)], args=[limit.capacity, repr(limit.per_ms), cost]
        )
        return self.wait_ms(reply)

    def send_take(self, pipe: Pipeline, principal: str, cost: int = 1) -> None:
        """:meth:`take` queued on ``pipe``, as a bare ``EVALSHA`` (redis-py's pipelined scripts ask
        ``SCRIPT EXISTS`` first, a round trip of their own). Its reply goes to :meth:`wait_ms`; a
        ``NoScriptError`` (a restarted Redis) took nothing, and :meth:`take` then loads the script."""
        limit = self.limit
        pipe.evalsha(self._take.sha, 1, limit.bucket_key(principal), limit.capacity, repr(limit.per_ms), cost)

    @staticmethod
    def wait_ms(reply: Any) -> int:
        """The take script's reply as :meth:`take` answers it."""
        allowed, wait_ms = reply
        return 0 if int(allowed) else max(1, int(wait_ms))

    async def give_back(self, principal: str, tokens: int = 1) -> None:
        limit = self.limit
        await self._give_back(keys=[limit.bucket_key(principal)], args=[limit.capacity, tokens])


def retry_after_s(wait_ms: int) -> int:
    """Whole seconds a refused client should wait: never 0, rounded up."""
    return max(1, -(-int(wait_ms) // 1000))
