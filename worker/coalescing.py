"""Finding batch partners for a job a worker has just claimed, and keeping RQ's books on the ones it takes.

A worker that dequeued a text-to-image job looks at the first ``lookahead`` jobs still waiting on the RQ
queue and takes those with the same :func:`worker.engine.batch_key` (see ``worker.runner``), without
waiting for more. What makes a job ours is the job store's atomic QUEUED -> RUNNING claim, the same one
every run goes through: if another worker dequeues a job we claimed a moment before, its claim fails and
it skips the job. After the claim the job is taken off the RQ list (``LREM``) and its RQ job marked
started, then finished with the batch, so RQ never shows it as queued, nor keeps its id on the list.

Partners are not in RQ's started registry (only the job RQ itself dequeued is): lost-job recovery works
from the job store's running set and heartbeats, and re-enqueues a lost partner's RQ job like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import structlog
from pydantic import ValidationError
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry
from rq.results import Result
from rq.utils import now

from schemas.generation import NORMALIZED_CONTEXT, GenerationRequest
from services.jobs import JobRecord, JobStore, job_key
from worker.engine import BatchKey, batch_key

log = structlog.get_logger(__name__)
DEFAULT_RESULT_TTL_S = 500  # RQ's own default, for an RQ job enqueued without result_ttl


@dataclass(frozen=True)
class Candidate:
    """A job waiting on the queue, as far as choosing partners needs to know it."""

    job_id: str
    key: BatchKey | None
    num_images: int


def request_batch_key(request: dict[str, Any] | None, init_image_key: str | None) -> BatchKey | None:
    """The batch key of a stored (normalised) request; None if it must run alone or cannot be read."""
    if init_image_key or not request:
        return None
    try:
        parsed = GenerationRequest.model_validate(request, context=NORMALIZED_CONTEXT)
    except ValidationError:
        return None  # the run itself reports what is wrong with it
    return batch_key(parsed)


def record_batch_key(record: JobRecord) -> BatchKey | None:
    return request_batch_key(record.request, record.init_image_key)


def record_images(record: JobRecord) -> int:
    return int(record.request.get("num_images", 1))


def queued_candidates(store: JobStore, queue: Queue, lookahead: int) -> list[Candidate]:
    """The first ``lookahead`` jobs on the queue that are still ``queued``: two round trips in all."""
    raw_ids = cast(list[bytes], store.redis.lrange(queue.key, 0, lookahead - 1))
    job_ids = [raw.decode() for raw in raw_ids]
    with store.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(job_key(job_id), ["status", "request", "init_image_key"])
        rows = cast(list[list[bytes | None]], pipe.execute())
    found = []
    for job_id, (status, request, init_image_key) in zip(job_ids, rows, strict=True):
        if status != b"queued" or request is None:
            continue
        parsed = json.loads(request)
        key = request_batch_key(parsed, init_image_key.decode() if init_image_key else None)
        found.append(Candidate(job_id, key, int(parsed.get("num_images", 1))))
    return found


def take_off_queue(queue: Queue, job_id: str, worker_name: str) -> None:
    """After our claim: off the RQ list (no worker need dequeue it just to skip it) and marked started."""
    connection = queue.connection
    connection.lrem(queue.key, 1, job_id)
    if connection.exists(Job.key_for(job_id)):
        connection.hset(
            Job.key_for(job_id),
            mapping={"status": JobStatus.STARTED.value, "worker_name": worker_name},
        )


def finish_rq_job(queue: Queue, job_id: str, result: str, worker_name: str) -> None:
    """Record the end of a partner's run on its RQ job as RQ does for the job it ran itself: finished, a
    result, in the finished registry, expiring after its ``result_ttl``."""
    job = Job.fetch(job_id, connection=queue.connection, serializer=queue.serializer)
    ttl = job.get_result_ttl(DEFAULT_RESULT_TTL_S)
    job.ended_at = now()
    with queue.connection.pipeline() as pipe:
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        job.save(pipeline=pipe, include_meta=False, include_result=False)
        Result.create(
            job, Result.Type.SUCCESSFUL, ttl, return_value=result, worker_name=worker_name, pipeline=pipe
        )
        if ttl != 0:
            FinishedJobRegistry(queue=queue).add(job, ttl, pipe)
        job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
        pipe.execute()
