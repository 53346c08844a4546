"""Which workers are ready to serve which model: the fleet's presence in Redis.

A GPU worker announces itself for its model once the model is loaded and warm, then again every heartbeat
interval from a side thread (so a worker busy with a long job still counts), each time for ``ttl`` seconds.
``GET /v1/models`` counts the announcements that have not run out. A worker that stops cleanly withdraws
at once; one that is killed drops out of the count after ``ttl`` — the same ``lost_after`` that lost-job
recovery waits, so "ready" and "presumed dead" never disagree for long.

RQ's own worker registry is not used for this: an idle RQ worker refreshes its key only every few minutes
(its blocking dequeue), so a SIGKILLed worker would be counted as ready for that long.

Three more records let the API tell "no worker yet" from "nobody will ever serve this" (stranded jobs,
``services/jobs/unserved.py``): a worker announces itself *loading* its model while it loads (minutes for
the real model), the last moment a worker of each model was counted ready is kept after it is gone, and
every API process announces the models it accepts in requests, the same way workers announce theirs.
Keys are ``darkroom:fleet…``; model names have no ':' (``schemas.models``), so no model's key is another's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis
import structlog
from redis import Redis

from services.clients import REDIS_UNAVAILABLE

log = structlog.get_logger(__name__)
_PRESENCE_PREFIX = "darkroom:fleet:"  # + model name → sorted set: worker name scored by expiry (unix s)
FIRST_SEEN_KEY = "darkroom:fleet:first-seen"  # hash: model name → unix s a worker first served it
_LOADING_PREFIX = "darkroom:fleet-loading:"  # + model name → sorted set: loading workers by expiry
LAST_READY_KEY = "darkroom:fleet-last-ready"  # hash: model name → unix s a worker was last counted ready
ACCEPTED_KEY = "darkroom:fleet-accepted"  # sorted set: model names an API accepts, scored by expiry


def presence_key(model: str) -> str:
    return f"{_PRESENCE_PREFIX}{model}"


def loading_key(model: str) -> str:
    return f"{_LOADING_PREFIX}{model}"


def announce(redis: Redis, model: str, worker: str, ttl_s: float, *, now: float | None = None) -> None:
    """Count ``worker`` as ready for ``model`` for the next ``ttl_s`` seconds; forget expired entries."""
    moment = time.time() if now is None else now
    with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(presence_key(model), {worker: moment + ttl_s})
        pipe.zremrangebyscore(presence_key(model), "-inf", moment)
        pipe.hsetnx(FIRST_SEEN_KEY, model, int(moment))
        pipe.hset(LAST_READY_KEY, model, moment + ttl_s)
        pipe.execute()


def withdraw(redis: Redis, model: str, worker: str) -> None:
    """``worker`` stops serving ``model`` now (it was ready until this moment)."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.zrem(presence_key(model), worker)
        pipe.hset(LAST_READY_KEY, model, time.time())
        pipe.execute()


def announce_loading(
    redis: Redis, model: str, worker: str, ttl_s: float, *, now: float | None = None
) -> None:
    """``worker`` is loading ``model`` (not ready yet) for the next ``ttl_s`` seconds."""
    moment = time.time() if now is None else now
    with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(loading_key(model), {worker: moment + ttl_s})
        pipe.zremrangebyscore(loading_key(model), "-inf", moment)
        pipe.execute()


def withdraw_loading(redis: Redis, model: str, worker: str) -> None:
    redis.zrem(loading_key(model), worker)


def accept(redis: Redis, models: Sequence[str], ttl_s: float, *, now: float | None = None) -> None:
    """An API process accepts ``models`` in requests, for the next ``ttl_s`` seconds."""
    if not models:
        return
    moment = time.time() if now is None else now
    redis.zadd(ACCEPTED_KEY, dict.fromkeys(models, moment + ttl_s), gt=True)


@dataclass(frozen=True)
class Coverage:
    """What the fleet offers one model right now (``now`` as unix s)."""

    ready: int  # workers ready for it
    loading: int  # workers loading it
    last_ready: float | None  # until when a worker was last counted ready (None: never, or forgotten)
    accepted: bool  # some API process accepts it in requests

    @property
    def served(self) -> bool:
        """A worker has it, or is about to."""
        return bool(self.ready or self.loading)


def coverage(redis: Redis, models: Sequence[str], *, now: float | None = None) -> dict[str, Coverage]:
    """Each of ``models``' :class:`Coverage`, in one round trip."""
    if not models:
        return {}
    moment = time.time() if now is None else now
    with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.zcount(presence_key(model), f"({moment}", "+inf")
            pipe.zcount(loading_key(model), f"({moment}", "+inf")
            pipe.zscore(ACCEPTED_KEY, model)
        pipe.hmget(LAST_READY_KEY, list(models))
        *answers, last_ready = pipe.execute()
    return {
        model: Coverage(
            ready=int(answers[3 * index]),
            loading=int(answers[3 * index + 1]),
            last_ready=float(last_ready[index]) if last_ready[index] else None,
            accepted=answers[3 * index + 2] is not None and float(answers[3 * index + 2]) > moment,
        )
        for index, model in enumerate(models)
    }


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
    job can reach the worker then); they resume when Redis answers. ``loading``: announce the worker as
    loading the model instead (before it is ready).
    """

    def __init__(
        self,
        redis: Redis,
        model: str,
        worker: str,
        *,
        interval_s: float,
        ttl_s: float,
        loading: bool = False,
    ) -> None:
        self.redis, self.model, self.worker = redis, model, worker
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self._announce = announce_loading if loading else announce
        self._withdraw = withdraw_loading if loading else withdraw
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-presence", daemon=True)

    def beat(self) -> None:
        try:
            self._announce(self.redis, self.model, self.worker, self.ttl_s)
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
            self._withdraw(self.redis, self.model, self.worker)
        except Exception:  # Redis away at shutdown: the entry runs out by itself after ttl
            log.warning("presence not withdrawn; it expires by itself", exc_info=True)
