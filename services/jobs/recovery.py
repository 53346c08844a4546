"""Finding jobs whose worker died mid-run and putting them back at the front of their queue.

RQ's ``SimpleWorker`` would leave such a job "started" until its registry entry expires (job timeout +
60 s) and the next maintenance pass (up to 10 minutes later) — and then *fail* it. Product backends cannot
re-create jobs, so every GPU worker runs this pass every few seconds: a running job whose heartbeat is older
than ``lost_after`` is requeued (``Lifecycle.requeue``: guarded by the very heartbeat judged stale, so a
slow-but-alive worker is never robbed twice; back at the front of the queue it came from, its dead
execution out of RQ's started registry, all in the same step), and after ``max_attempts`` lost runs it
fails as ``worker_lost`` (``Lifecycle.fail_lost``, with the ``generation.failed`` and ``batch.completed``
events any failure has) instead of crashing workers forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from rq import Queue

from schemas.jobs import JobStatus
from services import rq_records
from services.jobs.lifecycle import Lifecycle, Transition
from services.jobs.records import JobRecord, utcnow
from services.jobs.store import JobStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Recovered:
    job_id: str
    action: str  # "requeued" | "failed" | "dropped"
    attempt: int


def _requeue_or_fail(
    lifecycle: Lifecycle,
    queue: Queue,
    record: JobRecord,
    *,
    guard: tuple[str, str],
    reason: str,
    max_attempts: int,
) -> Recovered | None:
    """Put a running job whose run was cut short back at the front of its queue (or fail it as
    ``worker_lost`` once it has used ``max_attempts`` runs); None if ``guard`` no longer holds."""
    redis = lifecycle.redis
    done: Transition
    if record.attempt >= max_attempts:
        message = f"{reason}; giving up after {max_attempts}"
        forget = rq_records.run_forgotten(redis, queue, record.id)
        done = lifecycle.fail_lost(record, message, guard=guard, rq=forget)
        if not done.applied:
            return None
        log.error("job failed: worker lost too often", job_id=record.id, attempts=record.attempt)
        return Recovered(record.id, "failed", record.attempt)
    done = lifecycle.requeue(record, guard=guard, rq=rq_records.requeued_at_front(redis, queue, record.id))
    if not done.applied:
        return None
    log.warning("lost job requeued", job_id=record.id, reason=reason)
    return Recovered(record.id, "requeued", record.attempt + 1)


def recover_lost_jobs(
    store: JobStore,
    lifecycle: Lifecycle,
    queue: Queue,
    *,
    lost_after: timedelta,
    max_attempts: int,
    now: datetime | None = None,
) -> list[Recovered]:
    """One recovery pass over the running jobs; returns what it did."""
    moment = now or utcnow()
    done: list[Recovered] = []
    for job_id in store.running_job_ids():
        record = store.get(job_id)
        if record is None:  # expired record: nothing to recover
            store.forget_running(job_id)
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
            lifecycle, queue, record, guard=guard, reason=reason, max_attempts=max_attempts
        )
        if outcome is not None:
            done.append(outcome)
    return done


def release_interrupted_job(
    store: JobStore,
    lifecycle: Lifecycle,
    queue: Queue,
    job_id: str,
    *,
    worker_name: str,
    max_attempts: int,
) -> Recovered | None:
    """After a worker's run of ``job_id`` was cut short by lost Redis connectivity, make sure the job is
    not stranded; called by that worker once Redis answers again.

    - still ``running`` under this worker's name: nobody will finish it, so requeue it now (as recovery
      would after ``lost_after``, only sooner), guarded by the worker name;
    - still ``queued`` but no longer on its queue (RQ popped it, then Redis went away before the worker
      claimed it): put it back at the front;
    - anything else (finished, or taken over by another worker) needs nothing.
    """
    record = store.get(job_id)
    if record is None:
        return None
    if record.status is JobStatus.RUNNING and record.worker == worker_name:
        reason = f"worker {worker_name} lost its Redis connection during attempt {record.attempt}"
        return _requeue_or_fail(
            lifecycle, queue, record, guard=("worker", worker_name), reason=reason, max_attempts=max_attempts
        )
    if record.status is JobStatus.QUEUED and rq_records.put_back_at_front(store.redis, queue, job_id):
        log.warning("unclaimed job put back on the queue", job_id=job_id)
        return Recovered(job_id, "requeued", record.attempt)
    return None
