"""Which workers are ready to serve which model: the fleet's presence in Redis.

A GPU worker announces itself for its model once the model is loaded and warm, then again every heartbeat
interval from a side thread (so a worker busy with a long job still counts), each time for ``ttl`` seconds.
``GET /v1/models`` counts the announcements that have not run out. A worker that stops cleanly withdraws
at once; one that is killed drops out of the count after ``ttl`` — the same ``lost_after`` that lost-job
recovery waits, so "ready" and "presumed dead" never disagree for long.

RQ's own worker registry is not used for this: an idle RQ worker refreshes its key only every few minutes
(its blocking dequeue), so a SIGKILLed worker would be counted as ready for that long.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aredis
import structlog
from redis import Redis

from services.clients import REDIS_UNAVAILABLE

log = structlog.get_logger(__name__)
_PRESENCE_PREFIX = "darkroom:fleet:"  # + model name → sorted set: worker name scored by expiry (unix s)
FIRST_SEEN_KEY = "darkroom:fleet:first-seen"  # hash: model name → unix s a worker first served it


def presence_key(model: str) -> str:
    return f"{_PRESENCE_PREFIX}{model}"


def announce(redis: Redis, model: str, worker: str, ttl_s: float, *, now: float | None = None) -> None:
    """Count ``worker`` as ready for ``model`` for the next ``ttl_s`` seconds; forget expired entries."""
    moment = time.time() if now is None else now
    with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(presence_key(model), {worker: moment + ttl_s})
        pipe.zremrangebyscore(presence_key(model), "-inf", moment)
        pipe.hsetnx(FIRST_SEEN_KEY, model, int(moment))
        pipe.execute()


def withdraw(redis: Redis, model: str, worker: str) -> None:
    redis.zrem(presence_key(model), worker)


async def ready_counts(
    redis: aredis.Redis, models: Sequence[str], *, now: float | None = None
) -> dict[str, int]:
    """How many workers are ready for each of ``models``, in one round trip."""
    moment = time.time() if now is None else now
    async with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.zcount(presence_key(model), f"({moment}", "+inf")
        counts: list[Any] = await pipe.execute()
    return {model: int(count) for model, count in zip(models, counts, strict=True)}


async def first_seen(redis: aredis.Redis, models: Sequence[str]) -> dict[str, int | None]:
    """Unix time a worker first served each model (None: never)."""
    if not models:
        return {}
    values: list[Any] = await redis.hmget(FIRST_SEEN_KEY, list(models))
    return {model: int(value) if value else None for model, value in zip(models, values, strict=True)}


class Presence:
    """Keeps one worker announced for its model from a side thread until :meth:`stop`.

    A Redis outage only pauses the announcements (the entry may lapse meanwhile, which is the truth: no
    job can reach the worker then); they resume when Redis answers.
    """

    def __init__(self, redis: Redis, model: str, worker: str, *, interval_s: float, ttl_s: float) -> None:
        self.redis, self.model, self.worker = redis, model, worker
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-presence", daemon=True)

    def beat(self) -> None:
        try:
            announce(self.redis, self.model, self.worker, self.ttl_s)
        except REDIS_UNAVAILABLE as exc:
            log.warning("presence not announced: redis unavailable", error=str(exc))
        except Exception:  # never let bookkeeping take the worker down
            log.warning("presence not announced", exc_info=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            withdraw(self.redis, self.model, self.worker)
        except Exception:  # Redis away at shutdown: the entry runs out by itself after ttl
            log.warning("presence not withdrawn; it expires by itself", exc_info=True)
