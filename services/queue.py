"""RQ plumbing shared by the API (job fields, position, cancel) and the workers (queues to listen on).

Jobs are enqueued by dotted path with the JSON serializer: the API never imports the worker's code (so
never torch), and nothing in Redis is a pickle.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now

from services.settings import Settings

GENERATION_TASK = "worker.tasks.run_generation"
WEBHOOK_TASK = "services.webhooks.tasks.deliver_webhook"
BATCH_WEBHOOK_TASK = "services.webhooks.tasks.deliver_batch_webhook"


def generation_queue(redis: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)


def batch_queue(redis: Redis, settings: Settings) -> Queue:
    """Batch items (``POST /v1/batches``): GPU workers listen on it after the generation queue, so RQ
    hands them a batch item only when no interactive job is waiting."""
    return Queue(settings.batch_queue_name, connection=redis, serializer=JSONSerializer)


def webhook_queue(redis: Redis, settings: Settings) -> Queue:
    return Queue(settings.webhook_queue_name, connection=redis, serializer=JSONSerializer)


def generation_job_fields(queue: Queue, job_id: str, settings: Settings) -> dict[str, Any]:
    """RQ's own hash for a generation job, as ``Queue.enqueue`` would write it, for the API's admission
    script to store (``services/admission.py``). RQ's job id is our job id, so either finds the other."""
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


def queue_position(redis: Redis, queue: Queue, job_id: str) -> int | None:
    """1-based place in line (1 = next to run), or None when the job is not waiting in the queue."""
    index: Any = redis.lpos(queue.key, job_id)
    return None if index is None else int(index) + 1


def remove_from_queue(redis: Redis, queue: Queue, job_id: str) -> bool:
    """Take a waiting job out of the list so no worker dequeues it; True if it was there."""
    return bool(redis.lrem(queue.key, 0, job_id))
