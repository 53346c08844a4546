"""Turning something that happened to a job into a scheduled webhook delivery.

Called from the GPU worker right after a status change, so this module stays light (Redis, RQ, no torch,
no HTTP) and never lets a webhook problem break a generation: the image is the product, the webhook is
a notification about it. Sending happens later, on the webhook queue (``services.webhooks.tasks``), where a
slow or broken receiver cannot hold a GPU.

Each event gets one ``msg_id`` (the Standard Webhooks ``webhook-id``) that all of its attempts share, and a
delivery record in the job store that users can read on the job (``webhook.deliveries``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import structlog
from redis import Redis
from rq import Queue
from rq.job import Job as RQJob

from services.batches import BatchStore
from services.jobs import JobStore, utcnow
from services.queue import BATCH_WEBHOOK_TASK, WEBHOOK_TASK
from services.webhooks.delivery import new_msg_id

log = structlog.get_logger(__name__)

#: Pseudo-event meaning "the job's terminal status", and the subscription that covers all of them.
COMPLETED = "completed"

#: Internal event (a job status, or progress) -> the ``type`` field of the webhook payload.
EVENT_TYPES: Mapping[str, str] = {
    "started": "generation.started",
    "progress": "generation.progress",
    "succeeded": "generation.succeeded",
    "failed": "generation.failed",
    "canceled": "generation.canceled",
}
#: Internal event -> the subscription (``webhook_events`` on the request) that asks for it.
SUBSCRIPTIONS: Mapping[str, str] = {
    "started": "started",
    "progress": "progress",
    "succeeded": COMPLETED,
    "failed": COMPLETED,
    "canceled": COMPLETED,
}

#: The one event of a batch as a whole (``POST /v1/batches``), sent once when its last item ends.
BATCH_COMPLETED = "batch.completed"

#: RQ's outer bound on one delivery task when the caller knows no better (see ``task_timeout``).
DEFAULT_TASK_TIMEOUT = timedelta(seconds=60)
#: Finished tasks need not linger: the delivery record on the job is what users and operators read.
TASK_RESULT_TTL = timedelta(hours=1)
#: A failed task means a bug on our side; keep it long enough for someone to look.
TASK_FAILURE_TTL = timedelta(days=7)


def task_timeout(webhook_timeout: timedelta) -> timedelta:
    """RQ ``job_timeout`` for one attempt whose HTTP phases are each bounded by ``webhook_timeout``.

    httpx bounds connect, write and every read separately, so an attempt can legitimately take a few
    timeouts; the RQ timeout only has to stop a receiver that trickles its headers forever.
    """
    return max(DEFAULT_TASK_TIMEOUT, 4 * webhook_timeout + timedelta(seconds=15))


def task_job_id(msg_id: str, attempt: int) -> str:
    """RQ job id of one attempt: explicit, so an attempt can be found (and is never enqueued twice)."""
    return f"webhook-{msg_id}-{attempt}"


def enqueue_attempt(
    queue: Queue,
    job_id: str,
    msg_id: str,
    attempt: int,
    *,
    delay: timedelta | None = None,
    timeout: timedelta = DEFAULT_TASK_TIMEOUT,
    task: str = WEBHOOK_TASK,
) -> RQJob:
    """Put attempt number ``attempt`` of a message on the webhook queue, now or after ``delay``.

    A delayed attempt waits in RQ's scheduled registry until a worker started ``with_scheduler`` moves it
    to the queue (about one second of resolution). The arguments are plain JSON: the queue must use
    ``JSONSerializer`` (``services.queue.webhook_queue``), never pickle. ``task``: ``BATCH_WEBHOOK_TASK``
    for a batch's message (``job_id`` is then the batch id).
    """
    options: dict[str, Any] = {
        "job_id": task_job_id(msg_id, attempt),
        "job_timeout": max(1, int(timeout.total_seconds())),
        "result_ttl": int(TASK_RESULT_TTL.total_seconds()),
        "failure_ttl": int(TASK_FAILURE_TTL.total_seconds()),
        "description": f"webhook {msg_id} attempt {attempt} for {job_id}",
    }
    if delay is not None and delay > timedelta(0):
        return queue.enqueue_in(delay, task, job_id, msg_id, attempt, **options)
    return queue.enqueue(task, job_id, msg_id, attempt, **options)


def new_delivery(event_type: str, msg_id: str) -> dict[str, Any]:
    """A fresh delivery record (the stored form of ``schemas.jobs.WebhookDelivery``).

    ``created_at`` is when the event happened; it doubles as the payload's ``timestamp``, so it stays the
    same on every attempt.
    """
    return {
        "event": event_type,
        "msg_id": msg_id,
        "state": "pending",
        "attempts": [],
        "created_at": utcnow().isoformat(),
    }


def schedule_webhook_event(
    store: JobStore,
    queue: Queue,
    job_id: str,
    event: str,
    *,
    delay: timedelta | None = None,
    timeout: timedelta = DEFAULT_TASK_TIMEOUT,
) -> str | None:
    """Schedule delivery of ``event`` for the job, if its webhook subscribed to it; return the msg_id.

    ``event`` is ``started``, ``progress``, a terminal status (``succeeded``/``failed``/``canceled``, a
    ``JobStatus`` works too), or ``completed``: "whichever terminal status the job has now", read from the
    store, so a caller that has just finished the job need not repeat its outcome. All three terminal
    events are covered by the ``completed`` subscription.
    Returns None, without raising, when there is nothing to send (no webhook, not subscribed, the receiver
    answered 410 Gone earlier) or when Redis trouble stopped us — that is logged. An unknown ``event`` is a
    programming error and raises ``ValueError``. Pass ``timeout=task_timeout(settings.webhook_timeout)``
    when settings are at hand.
    """
    name = str(event)  # a StrEnum's str() is its value
    if name != COMPLETED and name not in EVENT_TYPES:
        raise ValueError(
            f"unknown webhook event {name!r}; expected {COMPLETED!r} or one of {sorted(EVENT_TYPES)}"
        )
    bound = log.bind(job_id=job_id, webhook_event=name)
    try:
        record = store.get(job_id)
        if record is None:
            bound.warning("webhook.schedule_skipped", reason="job_not_found")
            return None
        if name == COMPLETED:
            if not record.status.is_terminal:
                bound.warning(
                    "webhook.schedule_skipped", reason="job_not_finished", status=record.status.value
                )
                return None
            name = record.status.value
        event_type = EVENT_TYPES[name]
        if not record.webhook or SUBSCRIPTIONS[name] not in record.webhook.get("events", [COMPLETED]):
            return None
        if any(d.get("state") == "gone" for d in store.deliveries(job_id)):
            # The receiver told us to stop (410) for an earlier event of this job: respect it.
            bound.info("webhook.schedule_skipped", reason="receiver_gone")
            return None
        msg_id = new_msg_id()
        store.put_delivery(job_id, msg_id, new_delivery(event_type, msg_id))
        enqueue_attempt(queue, job_id, msg_id, 1, delay=delay, timeout=timeout)
    except Exception:
        # Redis down, a corrupt record...: the generation itself must not fail because of a webhook.
        bound.exception("webhook.schedule_failed")
        return None
    bound.info("webhook.scheduled", msg_id=msg_id)
    return msg_id


def schedule_batch_event(
    redis: Redis, queue: Queue, batch_id: str, *, timeout: timedelta = DEFAULT_TASK_TIMEOUT
) -> str | None:
    """Schedule the batch's one ``batch.completed`` delivery; return its msg_id.

    Called by whoever made the transition that ended the batch's last item (``Transition.batch_done``):
    a GPU worker, a cancel, lost-job recovery. The batch's ``notified`` flag (HSETNX) makes it once only.
    Like :func:`schedule_webhook_event` it never raises: None when there is nothing to send (no webhook,
    not subscribed, already scheduled) or on Redis trouble (logged).
    """
    bound = log.bind(batch_id=batch_id, webhook_event=BATCH_COMPLETED)
    batches = BatchStore(redis)
    try:
        record = batches.get(batch_id)
        if record is None or record.completed_at is None:
            bound.warning("webhook.schedule_skipped", reason="batch_missing_or_unfinished")
            return None
        if not record.webhook or BATCH_COMPLETED not in record.webhook.get("events", []):
            return None
        if not batches.claim_notification(batch_id):
            bound.info("webhook.schedule_skipped", reason="already_scheduled")
            return None
        msg_id = new_msg_id()
        batches.put_delivery(batch_id, msg_id, new_delivery(BATCH_COMPLETED, msg_id), record.retention_s)
        enqueue_attempt(queue, batch_id, msg_id, 1, timeout=timeout, task=BATCH_WEBHOOK_TASK)
    except Exception:
        bound.exception("webhook.schedule_failed")
        return None
    bound.info("webhook.scheduled", msg_id=msg_id)
    return msg_id
