"""Failing jobs stranded on a model nobody serves, instead of letting them wait forever.

A job waits on its model's queues (``services/queue.py``), which only workers of that model read. If none
ever comes — the model was taken out of the fleet, ``make run`` fell back from the hub model to the tiny
one, the workers cannot start — the job would stay ``queued`` for good. The API's sweep
(:class:`UnservedSweep`, every heartbeat interval in each API process) asks the lifecycle to fail such a
job ``model_unavailable`` (``Lifecycle.fail_unserved``: off its queue, ``generation.failed`` and a batch's
``batch.completed`` through the outbox, as any failure), under this rule:

- a model with a worker **ready or loading** (``services/fleet.py``) is served: its jobs wait, however long;
- a model **no API accepts any more** (removed from ``DARKROOM_MODELS``, or the dev fallback restarted the
  API on the tiny model) and without such a worker: its jobs fail at once — nobody can serve them, and the
  API refuses new ones (every API process announces what it accepts; an entry lapses ``lost_after`` after
  the last API accepting it stopped, so a rolling update that adds a model never strands its jobs);
- an **accepted** model without such a worker: a job fails once it has waited ``unserved_after`` with no
  worker ready (counted from its submission, or from when the model's last worker went, whichever is
  later). A fleet scaled to zero has time to schedule a pod: from the moment a worker process starts, it
  counts as loading. ``DARKROOM_UNSERVED_AFTER=0`` turns this part off.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from services import fleet, rq_records
from services.clients import REDIS_UNAVAILABLE
from services.jobs.keys import job_key
from services.jobs.lifecycle import Lifecycle
from services.jobs.records import utcnow
from services.settings import Settings

log = structlog.get_logger(__name__)
_QUEUE_KEY_PREFIX = "rq:queue:"  # RQ's key of a queue: this + its name


@dataclass(frozen=True)
class Stranded:
    job_id: str
    model: str
    accepted: bool  # False: no API accepts the model any more


def _waiting_models(redis: Redis, settings: Settings, accepted: tuple[str, ...]) -> dict[str, list[Queue]]:
    """Each model with a queue — accepted ones, and any RQ knows a queue of — and its queues."""
    prefixes = (f"{settings.queue_name}:", f"{settings.batch_queue_name}:")
    names: set[str] = {f"{prefix}{model}" for prefix in prefixes for model in accepted}
    known = cast(set[bytes], redis.smembers(Queue.redis_queues_keys))
    names |= {key.decode().removeprefix(_QUEUE_KEY_PREFIX) for key in known}
    models: dict[str, list[Queue]] = {}
    for name in sorted(names):
        prefix = next((prefix for prefix in prefixes if name.startswith(prefix)), None)
        if prefix is not None and len(name) > len(prefix):
            queue = Queue(name, connection=redis, serializer=JSONSerializer)
            models.setdefault(name[len(prefix) :], []).append(queue)
    return models


def _created_at(redis: Redis, job_ids: list[str]) -> list[datetime | None]:
    with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(job_key(job_id), "created_at")
        raw: list[Any] = pipe.execute()
    return [datetime.fromisoformat(value.decode()) if value else None for value in raw]


def _message(model: str, accepted: bool, waited: timedelta) -> str:
    if not accepted:
        return (
            f"model {model!r} is no longer served here: no API accepts it any more and no worker of it is "
            "ready or loading (GET /v1/models lists the served models); submit the request again with one "
            "of those"
        )
    minutes = round(waited.total_seconds() / 60, 1)
    return (
        f"no worker of model {model!r} was ready for {minutes:g} min (DARKROOM_UNSERVED_AFTER), and none "
        f"is loading it (GET /v1/models/{model} shows its ready_workers); submit the request again once "
        "one is, or ask the operator to start one"
    )


def fail_unserved_jobs(
    redis: Redis,
    lifecycle: Lifecycle,
    settings: Settings,
    *,
    accepted: tuple[str, ...] = (),
    now: datetime | None = None,
) -> list[Stranded]:
    """One sweep: fail every queued job stranded on a model nobody serves (see the module's rule).
    ``accepted``: the models this API accepts (also counted as accepted when no other API says so)."""
    moment = now or utcnow()
    grace = settings.unserved_after
    waiting = _waiting_models(redis, settings, accepted)
    covered = fleet.coverage(redis, sorted(waiting), now=moment.timestamp())
    failed: list[Stranded] = []
    for model, queues in waiting.items():
        cover = covered[model]
        if cover.served:
            continue
        is_accepted = cover.accepted or model in accepted
        if is_accepted and not grace:
            continue
        # The later of "its last worker went" and each job's submission must lie ``grace`` back.
        last_ready = datetime.fromtimestamp(cover.last_ready, moment.tzinfo) if cover.last_ready else None
        if is_accepted and last_ready is not None and moment - last_ready < grace:
            continue
        for queue in queues:
            job_ids = [raw.decode() for raw in cast(list[bytes], redis.lrange(queue.key, 0, -1))]
            if not job_ids:
                continue
            created = _created_at(redis, job_ids) if is_accepted else [None] * len(job_ids)
            rq = rq_records.remove_from_queue(queue)
            for job_id, created_at in zip(job_ids, created, strict=True):
                if is_accepted and (created_at is None or moment - created_at < grace):
                    continue  # not waited long enough yet (or no record: the worker drops it)
                waited = moment - max(filter(None, (last_ready, created_at)), default=moment)
                done = lifecycle.fail_unserved(job_id, _message(model, is_accepted, waited), rq=rq)
                if done.applied:
                    failed.append(Stranded(job_id, model, is_accepted))
    if failed:
        log.warning(
            "stranded jobs failed: their model is not served",
            jobs=len(failed),
            models=sorted({job.model for job in failed}),
        )
    return failed


class UnservedSweep:
    """The API's background task: announce the accepted models, then sweep, every heartbeat interval.

    Runs the blocking Redis work in a thread; every API process runs one (each transition is guarded by
    the job's status, so two sweeps cannot fail a job twice). A Redis outage only skips passes."""

    def __init__(self, redis: Redis, lifecycle: Lifecycle, settings: Settings) -> None:
        self.redis, self.lifecycle, self.settings = redis, lifecycle, settings
        self._task: asyncio.Task[None] | None = None

    def run_once(self) -> list[Stranded]:
        accepted = self.settings.accepted_models
        try:
            fleet.accept(self.redis, accepted, self.settings.lost_after.total_seconds())
            return fail_unserved_jobs(self.redis, self.lifecycle, self.settings, accepted=accepted)
        except REDIS_UNAVAILABLE as exc:
            log.warning("stranded-job sweep skipped: redis unavailable", error=str(exc))
        except Exception:  # a bug or a corrupt record must not end the sweeps; the next pass retries
            log.warning("stranded-job sweep failed", exc_info=True)
        return []

    async def _loop(self) -> None:
        interval = self.settings.heartbeat_interval.total_seconds()
        while True:
            await asyncio.to_thread(self.run_once)
            await asyncio.sleep(interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="unserved-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
