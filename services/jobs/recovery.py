"""Finding jobs whose worker died mid-run and putting them back at the front of the queue.

RQ's ``SimpleWorker`` would leave such a job "started" until its registry entry expires (job timeout +
60 s) and the next maintenance pass (up to 10 minutes later) — and then *fail* it. Product backends cannot
re-create jobs, so every GPU worker runs this pass every few seconds: a running job whose heartbeat is older
than ``lost_after`` is requeued (atomically, guarded by the very heartbeat judged stale, so a slow-but-alive
worker is never robbed twice), its dead execution is removed from RQ's started registry so RQ's own cleanup
cannot later fail the re-run, and after ``max_attempts`` lost runs it fails as ``worker_lost`` instead of
crashing workers forever.

A job goes back onto the queue it came from (its RQ job's ``origin``): the generation queue, or the batch
queue for a batch item (``POST /v1/batches``) — whichever queue the recovering worker was handed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

from schemas.jobs import JobStatus
from services.jobs import RUNNING_SET, JobRecord, JobStore, job_key, utcnow
from services.queue import queue_position

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Recovered:
    job_id: str
    action: str  # "requeued" | "failed" | "dropped"
    attempt: int
    #: Failing this job ended the last unfinished item of this batch: its ``batch.completed`` is due.
    batch_done: str | None = None


def origin_queue(redis: Redis, queue: Queue, job_id: str) -> Queue:
    """The queue the job was enqueued on (RQ's ``origin``), as a sibling of ``queue``; ``queue`` itself
    when the RQ job is gone or names no other queue."""
    origin = redis.hget(queue.job_class.key_for(job_id), "origin")
    name = origin.decode() if isinstance(origin, bytes) else None
    if not name or name == queue.name:
        return queue
    return Queue(name, connection=redis, serializer=queue.serializer)


def _forget_executions(redis: Redis, queue: Queue, job_id: str) -> None:
    """Remove the dead run's entries (``{job_id}:{execution_id}``) from RQ's started registry."""
    registry = StartedJobRegistry(queue=queue)
    members = cast(list[bytes], redis.zrange(registry.key, 0, -1))
    stale = [m for m in members if m.decode().split(":", 1)[0] == job_id]
    if stale:
        redis.zrem(registry.key, *stale)


def _requeue_rq_job(redis: Redis, queue: Queue, job_id: str) -> None:
    job = Job.fetch(job_id, connection=redis, serializer=queue.serializer)
    job.started_at = None
    job.ended_at = None
    queue.enqueue_job(job, at_front=True)  # it already waited its turn once


def _requeue_or_fail(
    store: JobStore,
    queue: Queue,
    record: JobRecord,
    *,
    guard: tuple[str, str],
    reason: str,
    max_attempts: int,
    moment: datetime,
) -> Recovered | None:
    """Put a running job whose run was cut short back at the front of the queue (or fail it as
    ``worker_lost`` once it has used ``max_attempts`` runs); None if ``guard`` no longer holds."""
    redis, job_id = store.redis, record.id
    queue = origin_queue(redis, queue, job_id)
    if record.attempt >= max_attempts:
        fields: dict[str, Any] = {
            "completed_at": moment,
            "error": {"type": "worker_lost", "message": f"{reason}; giving up after {max_attempts}"},
        }
        failed = store.transition(
            job_id, JobStatus.FAILED, allowed_from=(JobStatus.RUNNING,), fields=fields, guard=guard
        )
        if not failed.applied:
            return None
        _forget_executions(redis, queue, job_id)
        store.touch_terminal(job_id)
        log.error("job failed: worker lost too often", job_id=job_id, attempts=record.attempt)
        return Recovered(job_id, "failed", record.attempt, batch_done=failed.batch_done)
    fields = {"attempt": record.attempt + 1, "worker": "", "progress": ""}
    if not store.transition(
        job_id, JobStatus.QUEUED, allowed_from=(JobStatus.RUNNING,), fields=fields, guard=guard
    ).applied:
        return None
    _forget_executions(redis, queue, job_id)
    _requeue_rq_job(redis, queue, job_id)
    log.warning("lost job requeued", job_id=job_id, reason=reason)
    return Recovered(job_id, "requeued", record.attempt + 1)


def recover_lost_jobs(
    store: JobStore,
    queue: Queue,
    *,
    lost_after: timedelta,
    max_attempts: int,
    now: datetime | None = None,
) -> list[Recovered]:
    """One recovery pass over the running jobs; returns what it did."""
    redis = store.redis
    moment = now or utcnow()
    done: list[Recovered] = []
    for job_id in store.running_job_ids():
        record = store.get(job_id)
        if record is None:  # expired record: nothing to recover
            redis.srem(RUNNING_SET, job_key(job_id))
            done.append(Recovered(job_id, "dropped", 0))
            continue
        if record.status is not JobStatus.RUNNING:
            continue
        last_sign_of_life = record.heartbeat_at or record.started_at or record.created_at
        if moment - last_sign_of_life < lost_after:
            continue
        guard_field = "heartbeat_at" if record.heartbeat_at else "started_at"
        guard: tuple[str, str] = (guard_field, last_sign_of_life.isoformat())
        reason = f"worker {record.worker} stopped answering during attempt {record.attempt}"
        outcome = _requeue_or_fail(
            store, queue, record, guard=guard, reason=reason, max_attempts=max_attempts, moment=moment
        )
        if outcome is not None:
            done.append(outcome)
    return done


def release_interrupted_job(
    store: JobStore,
    queue: Queue,
    job_id: str,
    *,
    worker_name: str,
    max_attempts: int,
    now: datetime | None = None,
) -> Recovered | None:
    """After a worker's run of ``job_id`` was cut short by lost Redis connectivity, make sure the job is
    not stranded; called by that worker once Redis answers again.

    - still ``running`` under this worker's name: nobody will finish it, so requeue it now (as recovery
      would after ``lost_after``, only sooner), guarded by the worker name;
    - still ``queued`` but no longer on the queue (RQ popped it, then Redis went away before the worker
      claimed it): put it back at the front;
    - anything else (finished, or taken over by another worker) needs nothing.
    """
    record = store.get(job_id)
    if record is None:
        return None
    if record.status is JobStatus.RUNNING and record.worker == worker_name:
        reason = f"worker {worker_name} lost its Redis connection during attempt {record.attempt}"
        return _requeue_or_fail(
            store,
            queue,
            record,
            guard=("worker", worker_name),
            reason=reason,
            max_attempts=max_attempts,
            moment=now or utcnow(),
        )
    if record.status is JobStatus.QUEUED:
        queue = origin_queue(store.redis, queue, job_id)
    if record.status is JobStatus.QUEUED and queue_position(store.redis, queue, job_id) is None:
        _requeue_rq_job(store.redis, queue, job_id)
        log.warning("unclaimed job put back on the queue", job_id=job_id)
        return Recovered(job_id, "requeued", record.attempt)
    return None
