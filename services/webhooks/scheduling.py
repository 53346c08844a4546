"""Putting delivery attempts on the webhook queue, and the delivery record users read on the job.

Sending happens in the webhook process, where a slow or broken receiver cannot hold a GPU. The first
attempt of each event is sent by the outbox dispatcher's pool (``services.webhooks.dispatcher``; queued
here only without one); each attempt schedules the next with backoff on the webhook queue, one attempt per
RQ task (``services.webhooks.tasks``).

Each event has one ``msg_id`` (the Standard Webhooks ``webhook-id``) that all of its attempts share, and a
delivery record on the job (or batch) that users can read (``webhook.deliveries``).
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from rq import Callback, Queue
from rq.job import Job as RQJob

from services.queue import WEBHOOK_TASK

#: RQ's outer bound on one delivery task when the caller knows no better (see ``task_timeout``).
DEFAULT_TASK_TIMEOUT = timedelta(seconds=60)
#: Finished tasks need not linger: the delivery record on the job is what users and operators read.
TASK_RESULT_TTL = timedelta(hours=1)
#: A failed task means a bug on our side; keep it long enough for someone to look.
TASK_FAILURE_TTL = timedelta(days=7)
#: Runs when an attempt's task fails however it failed — an exception, RQ's timeout, or (found later by
#: RQ's registry cleanup) a process killed mid-attempt — so the attempt is recorded and retried.
ON_FAILURE = "services.webhooks.tasks.attempt_interrupted"


def task_timeout(attempt_deadline: timedelta) -> timedelta:
    """RQ ``job_timeout`` for one attempt whose HTTP exchange ends within ``attempt_deadline``.

    Only a backstop now: the deadline ends the exchange itself (``services.webhooks.deadline``); the rest
    is a few Redis round trips. Should it still fire, the attempt is recorded and retried all the same
    (``services.webhooks.tasks.attempt_interrupted``).
    """
    return max(DEFAULT_TASK_TIMEOUT, attempt_deadline + timedelta(seconds=30))


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
    waited: int = 0,
) -> RQJob:
    """Put attempt number ``attempt`` of a message on the webhook queue, now or after ``delay``.

    A delayed attempt waits in RQ's scheduled registry until a worker started ``with_scheduler`` moves it
    to the queue (about one second of resolution). The arguments are plain JSON: the queue must use
    ``JSONSerializer`` (``services.queue.webhook_queue``), never pickle. ``task``: ``BATCH_WEBHOOK_TASK``
    for a batch's message (``job_id`` is then the batch id).

    ``waited``: how many times this attempt was already put back because its receiver's host (or its API
    key) had no free slot (``services.webhooks.hosts``); such a retake gets an id of its own, the
    original's being taken.
    """
    rq_id = task_job_id(msg_id, attempt)
    if waited:
        rq_id = f"{rq_id}-wait{waited}-{secrets.token_hex(3)}"
    options: dict[str, Any] = {
        "job_id": rq_id,
        "job_timeout": max(1, int(timeout.total_seconds())),
        "result_ttl": int(TASK_RESULT_TTL.total_seconds()),
        "failure_ttl": int(TASK_FAILURE_TTL.total_seconds()),
        "description": f"webhook {msg_id} attempt {attempt} for {job_id}",
        "on_failure": Callback(ON_FAILURE),
    }
    options["args"] = (job_id, msg_id, attempt)
    options["kwargs"] = {"waited": waited} if waited else {}
    if delay is not None and delay > timedelta(0):
        return queue.enqueue_in(delay, task, **options)
    return queue.enqueue(task, **options)


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
