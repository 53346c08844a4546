"""Putting delivery attempts on the webhook queue, and the delivery record users read on the job.

Sending happens on the webhook queue (``services.webhooks.tasks``), one attempt per RQ task, where a slow
or broken receiver cannot hold a GPU. The first attempt of each event is scheduled by the outbox
dispatcher (``services.webhooks.dispatcher``); each attempt schedules the next with backoff.

Each event has one ``msg_id`` (the Standard Webhooks ``webhook-id``) that all of its attempts share, and a
delivery record on the job (or batch) that users can read (``webhook.deliveries``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from rq import Queue
from rq.job import Job as RQJob

from services.queue import WEBHOOK_TASK

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


def new_delivery(event_type: str, msg_id: str, created_at: str) -> dict[str, Any]:
    """A fresh delivery record (the stored form of ``schemas.jobs.WebhookDelivery``).

    ``created_at`` is when the event happened (ISO 8601); it doubles as the payload's ``timestamp``, so it
    stays the same on every attempt.
    """
    return {
        "event": event_type,
        "msg_id": msg_id,
        "state": "pending",
        "attempts": [],
        "created_at": created_at,
    }
