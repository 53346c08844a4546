"""RQ plumbing shared by the API (job fields, position, cancel) and the workers (queues to listen on).

Jobs are enqueued by dotted path with the JSON serializer: the API never imports the worker's code (so
never torch), and nothing in Redis is a pickle.

Every served model has its own two queues, named after it (``darkroom:<model>`` for interactive jobs,
``darkroom-batch:<model>`` for batch items): a worker listens only on its own model's, so a job can only
ever reach a worker holding the model it asked for, and each model's backlog is its own to scale on.
"""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from services.jobs.records import JobRecord
from services.settings import Settings

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
