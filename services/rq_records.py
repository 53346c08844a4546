"""The one module that reads or writes RQ's own records: its job hashes, queue lists, registries, results.

RQ stays our queue, but some of our atomic steps have to touch what RQ keeps — admission writes RQ's job
hash and pushes onto its list in the same script as our job record; a cancel takes the id off the list in
the same script as the status change; a requeue puts it back, at the front, in the same script as the
transition back to ``queued``; a coalesced job's RQ record is closed as RQ would close it. Each of those
builds RQ's side with RQ's own code (``Queue.create_job``, ``Job.to_dict``, the registries) and only
*applies* it in our scripts, so the layout is RQ's, read from RQ, and pinned by
``tests/services/test_rq_records.py`` for the RQ major version pyproject allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, cast

import redis.asyncio as aredis
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.utils import now, utcformat

from services.settings import Settings

GENERATION_TASK = "worker.tasks.run_generation"
#: RQ's own default ``result_ttl``, for an RQ job enqueued without one.
DEFAULT_RESULT_TTL_S = 500


def job_hash_key(job_id: str) -> str:
    """RQ's hash for job ``job_id`` (our job id doubles as RQ's)."""
    return Job.key_for(job_id)


def job_hash_prefix() -> str:
    """What RQ's job hash keys start with (scripts that write many derive them: ``prefix .. id``)."""
    return Job.redis_job_namespace_prefix


def queues_set_key(queue: Queue) -> str:
    """RQ's set of known queue keys (a push must add its queue to it, as ``Queue.enqueue`` does)."""
    return queue.redis_queues_keys


def generation_job_fields(queue: Queue, job_id: str, settings: Settings) -> dict[str, Any]:
    """RQ's own hash for a generation job, as ``Queue.enqueue`` would write it, for the admission scripts
    to store (``services/admission.py``)."""
    job = queue.create_job(
        GENERATION_TASK,
        args=(job_id,),
        job_id=job_id,
        timeout=int(settings.job_timeout.total_seconds()),
        result_ttl=int(settings.result_ttl.total_seconds()),
        failure_ttl=int(settings.failure_ttl.total_seconds()),
        description=f"generation {job_id}",
    )
    job.origin = queue.name
    job.enqueued_at = now()
    fields = job.to_dict()
    fields["status"] = JobStatus.QUEUED.value
    return fields


# --- reading the queue -------------------------------------------------------------------------------------


def queue_position(redis: Redis, queue: Queue, job_id: str) -> int | None:
    """1-based place in line (1 = next to run), or None when the job is not waiting in the queue."""
    index: Any = redis.lpos(queue.key, job_id)
    return None if index is None else int(index) + 1


async def queue_position_async(redis: aredis.Redis, queue: Queue, job_id: str) -> int | None:
    """:func:`queue_position` on the API's async client."""
    index = cast(int | None, await redis.lpos(queue.key, job_id))
    return None if index is None else index + 1


def waiting_ids(redis: Redis, queue: Queue, count: int) -> list[str]:
    """The first ``count`` job ids waiting on ``queue``, next to run first."""
    return [raw.decode() for raw in cast(list[bytes], redis.lrange(queue.key, 0, count - 1))]


def origin_queue(redis: Redis, queue: Queue, job_id: str) -> Queue:
    """The queue the job was enqueued on (RQ's ``origin``), as a sibling of ``queue``; ``queue`` itself
    when the RQ job is gone or names no other queue."""
    origin = redis.hget(job_hash_key(job_id), "origin")
    name = origin.decode() if isinstance(origin, bytes) else None
    if not name or name == queue.name:
        return queue
    return Queue(name, connection=redis, serializer=queue.serializer)


# --- what our transition script applies to RQ's records ----------------------------------------------------


@dataclass(frozen=True)
class RqChange:
    """RQ's side of one of our transitions, applied by the same script (``services.jobs.lifecycle``).

    ``queue_op``: ``remove`` takes the id off ``queue_key`` (a cancel, a coalesced partner), ``push_front``
    puts it back at the front (a requeue); ``job_fields`` are set on RQ's job hash; ``stale_executions``
    are removed from ``registry_key`` (RQ's started registry)."""

    queue_key: str = ""
    queue_op: str = ""
    job_key: str = ""
    job_fields: dict[str, str] = field(default_factory=dict)
    registry_key: str = ""
    stale_executions: list[str] = field(default_factory=list)
    queues_set: str = ""


def remove_from_queue(queue: Queue) -> RqChange:
    """A canceled queued job: off the list, so no worker dequeues it."""
    return RqChange(queue_key=queue.key, queue_op="remove")


def taken_by(queue: Queue, job_id: str, worker_name: str) -> RqChange:
    """A job a worker claimed without dequeuing it (a coalesced partner): off the list, and marked
    started by that worker, as RQ marks the job it dequeues itself."""
    return RqChange(
        queue_key=queue.key,
        queue_op="remove",
        job_key=job_hash_key(job_id),
        job_fields={"status": JobStatus.STARTED.value, "worker_name": worker_name},
    )


def run_forgotten(redis: Redis, queue: Queue, job_id: str) -> RqChange:
    """A lost run's ``{job_id}:{execution_id}`` entries out of RQ's started registry (of the queue the job
    came from), so RQ's own cleanup cannot later fail the job, or its re-run."""
    return _forget_runs(redis, origin_queue(redis, queue, job_id), job_id)


def requeued_at_front(redis: Redis, queue: Queue, job_id: str) -> RqChange:
    """A running job whose run was lost, back at the front of the queue it came from: RQ's job hash as
    ``Queue.enqueue_job`` leaves it, and the dead run forgotten (:func:`run_forgotten`)."""
    queue = origin_queue(redis, queue, job_id)
    fields = {
        "status": JobStatus.QUEUED.value,
        "origin": queue.name,
        "enqueued_at": utcformat(now()),
        "started_at": "",
        "ended_at": "",
    }
    return replace(
        _forget_runs(redis, queue, job_id),
        queue_key=queue.key,
        queue_op="push_front",
        job_key=job_hash_key(job_id),
        job_fields=fields,
        queues_set=queue.redis_queues_keys,
    )


def _forget_runs(redis: Redis, origin: Queue, job_id: str) -> RqChange:
    registry = StartedJobRegistry(queue=origin)
    members = cast(list[bytes], redis.zrange(registry.key, 0, -1))
    stale = [m.decode() for m in members if m.decode().split(":", 1)[0] == job_id]
    return RqChange(registry_key=registry.key, stale_executions=stale)


def put_back_at_front(redis: Redis, queue: Queue, job_id: str) -> bool:
    """A job still ``queued`` that RQ popped but nobody claimed (Redis went away in between): back at the
    front of its queue unless it is already listed. True if it was put back."""
    queue = origin_queue(redis, queue, job_id)
    if queue_position(redis, queue, job_id) is not None:
        return False
    job = Job.fetch(job_id, connection=redis, serializer=queue.serializer)
    job.started_at = None
    job.ended_at = None
    queue.enqueue_job(job, at_front=True)
    return True


# --- the GPU worker's own run of a job: RQ's bookkeeping, cut to what is read -----------------------------


def mark_started(pipe: Any, job: Job, worker_name: str) -> None:
    """Queue on ``pipe`` what RQ writes on its job hash when a worker starts it (status ``started``, the
    worker, the start time: what ``rq info`` and RQ's job API show) — without RQ's execution record, its
    started-registry entry and its heartbeats, which only RQ's own lost-job cleanup reads: our lifecycle
    tracks running jobs (``darkroom:jobs:running-by-beat``) and recovery requeues them."""
    job.prepare_for_execution(worker_name, pipeline=pipe)


def close_succeeded(
    pipe: Any, job: Job, return_value: Any, worker_name: str, default_result_ttl: int
) -> None:
    """Queue on ``pipe`` RQ's close of a job its worker ran to the end (``handle_job_success`` minus what
    our jobs never have — dependents, repeats — and minus the execution record never written): a result
    and the finished registry if the job keeps one, then RQ's cleanup (with ``result_ttl`` 0, our
    default, the job hash is deleted at once)."""
    ttl = job.get_result_ttl(default_result_ttl)
    job._result = return_value
    if ttl == 0:
        # ``Job.delete``'s keys, in one command: RQ's version also reads the execution registry (three
        # round trips) to delete executions this worker never wrote.
        pipe.delete(job.key, job.dependents_key, job.dependencies_key, Result.get_key(job.id))
    else:  # RQ's own: status, job hash, result, finished registry, expiry
        job._handle_success(ttl, pipeline=pipe, worker_name=worker_name)
        job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
    job._status = JobStatus.FINISHED


def finish_taken_job(queue: Queue, job_id: str, result: str, worker_name: str) -> None:
    """Close the RQ job of a coalesced partner as RQ closes the job it ran itself: finished, a result, in
    the finished registry, expiring after its ``result_ttl`` — or, with ``result_ttl`` 0, deleted at once.
    Bookkeeping only: our record has the outcome, and nothing reads RQ's results."""
    job = Job.fetch(job_id, connection=queue.connection, serializer=queue.serializer)
    ttl = job.get_result_ttl(DEFAULT_RESULT_TTL_S)
    job.ended_at = now()
    with queue.connection.pipeline() as pipe:
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        job.save(pipeline=pipe, include_meta=False, include_result=False)
        if ttl != 0:  # as RQ's worker: a result_ttl of 0 (our default) keeps no result
            Result.create(
                job, Result.Type.SUCCESSFUL, ttl, return_value=result, worker_name=worker_name, pipeline=pipe
            )
            FinishedJobRegistry(queue=queue).add(job, ttl, pipe)
        job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
        pipe.execute()
