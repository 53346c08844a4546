"""RQ plumbing shared by the API (job fields, position, cancel) and the workers (queues to listen on).

Jobs are enqueued by dotted path with the JSON serializer: the API never imports the worker's code (so
never torch), and nothing in Redis is a pickle.

Every served model has its own two queues, named after it (``darkroom:<model>`` for interactive jobs,
``darkroom-batch:<model>`` for batch items): a worker listens only on its own model's, so a job can only
ever reach a worker holding the model it asked for, and each model's backlog is its own to scale on.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now

from services.jobs import JobRecord
from services.settings import Settings

GENERATION_TASK = "worker.tasks.run_generation"
WEBHOOK_TASK = "services.webhooks.tasks.deliver_webhook"
BATCH_WEBHOOK_TASK = "services.webhooks.tasks.deliver_batch_webhook"


def generation_queue_name(settings: Settings, model: str | None = None) -> str:
    """The interactive queue of ``model`` (default: the one this process serves)."""
    return f"{settings.queue_name}:{model or settings.served_model}"


def batch_queue_name(settings: Settings, model: str | None = None) -> str:
    return f"{settings.batch_queue_name}:{model or settings.served_model}"


def generation_queue(redis: Redis, settings: Settings, model: str | None = None) -> Queue:
    return Queue(generation_queue_name(settings, model), connection=redis, serializer=JSONSerializer)


def batch_queue(redis: Redis, settings: Settings, model: str | None = None) -> Queue:
    """Batch items (``POST /v1/batches``): GPU workers listen on it after the generation queue, so RQ
    hands them a batch item only when no interactive job is waiting."""
    return Queue(batch_queue_name(settings, model), connection=redis, serializer=JSONSerializer)


def job_queue(redis: Redis, settings: Settings, record: JobRecord) -> Queue:
    """The queue ``record`` waits on: its model's batch queue for a batch item, else its model's
    generation queue. Records from before model routing name no model: the default model's."""
    model = record.request.get("model")
    return (batch_queue if record.batch_id else generation_queue)(redis, settings, model)


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
