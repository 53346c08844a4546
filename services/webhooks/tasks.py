"""The webhook RQ task: one delivery attempt per task execution, re-enqueued with backoff until done.

Why one attempt per task rather than the blocking ``deliver`` loop: a receiver that is down for an hour
must not pin a worker for an hour. Each attempt reads the job afresh, so the payload carries newly signed
image URLs even when a retry happens long after the event (stored URLs would have expired).

``deliver_webhook`` is the thin entry RQ calls by dotted path; it only gathers this process's clients and
calls ``run_delivery_attempt``, a plain function that tests drive directly with their own context.

Outcomes a receiver causes (errors, timeouts, 4xx/5xx, 410) are recorded on the delivery and end the task
normally; an exception means trouble on our side (no signing secret, Redis down, a bug), so RQ keeps the
task in its failed registry for an operator.

A batch's ``batch.completed`` goes the same way (``deliver_batch_webhook``): only where the delivery
record lives (on the batch) and what the payload carries (the batch, without its items) differ — the
:class:`Subject` of the attempt.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog
from rq import Queue
from rq.exceptions import AbandonedJobError
from rq.job import Job as RQJob
from rq.timeouts import JobTimeoutException

from services.batch_views import read_batch
from services.clients import ServiceClients, process_clients, retry_while_redis_down
from services.job_views import render_job
from services.jobs import JobRecord, JobStore
from services.jobs.batches import BatchRecord, BatchStore
from services.metrics import WEBHOOK_ATTEMPTS
from services.queue import BATCH_WEBHOOK_TASK, WEBHOOK_TASK, webhook_queue
from services.settings import Settings
from services.ssrf import Resolver, resolve_host
from services.storage import Storage
from services.webhooks.delivery import DeliveryAttempt, WebhookMessage, attempt_delivery, utcnow
from services.webhooks.hosts import HostLimiter, host_key, process_limiter
from services.webhooks.parking import ParkedAttempt, park
from services.webhooks.retry import RetryPolicy, Verdict, classify, next_delay
from services.webhooks.scheduling import enqueue_attempt, task_timeout
from services.webhooks.signing import decode_secret

log = structlog.get_logger(__name__)

# What ``run_delivery_attempt`` returns (RQ stores it as the task's result).
DELIVERED = "delivered"
RETRYING = "retrying"
FAILED = "failed"
GONE = "gone"
SKIPPED = "skipped"
WAITING = "waiting"  # the receiver's host or the API key had no free slot: parked, not attempted


class WebhookConfigError(RuntimeError):
    """Webhooks cannot be sent because of our own configuration (e.g. no signing secret)."""


@dataclass(frozen=True)
class DeliveryContext:
    """Everything one attempt needs, passed in so tests can swap clock, randomness and DNS."""

    store: JobStore
    storage: Storage
    queue: Queue
    client: httpx.Client
    secret: str | None
    policy: RetryPolicy
    allow_private: bool
    allow_http: bool
    url_expiry: timedelta
    task_timeout: timedelta
    batches: BatchStore | None = None  # for batch.completed messages
    #: Per-host share of the process's slots; None: no limit (tests that drive one attempt at a time).
    limiter: HostLimiter | None = None
    #: Per-API-key share of the process's slots (the subject's owner); None: no limit.
    key_limiter: HostLimiter | None = None
    #: Total time one HTTP exchange may take (``services.webhooks.deadline``); None: phase timeouts only.
    deadline_s: float | None = None
    clock: Callable[[], datetime] = utcnow
    rand: Callable[[], float] = random.random
    resolver: Resolver = resolve_host

    @classmethod
    def from_clients(cls, clients: ServiceClients) -> DeliveryContext:
        s: Settings = clients.settings
        return cls(
            store=clients.store,
            storage=clients.storage,
            queue=webhook_queue(clients.redis, s),
            client=clients.webhook_client,
            secret=s.webhook_secret.get_secret_value() if s.webhook_secret is not None else None,
            policy=retry_policy(s),
            allow_private=s.webhook_allow_private,
            allow_http=s.webhook_allow_http,
            url_expiry=s.url_expiry,
            task_timeout=task_timeout(s.webhook_attempt_deadline),
            batches=BatchStore(clients.redis),
            limiter=process_limiter(s.webhook_per_host, "host"),
            key_limiter=process_limiter(s.webhook_per_key, "key"),
            deadline_s=s.webhook_attempt_deadline.total_seconds(),
        )


def retry_policy(settings: Settings) -> RetryPolicy:
    """The backoff rules configured for this deployment."""
    return RetryPolicy(
        max_attempts=settings.webhook_max_attempts,
        base_delay_s=settings.webhook_backoff_base.total_seconds(),
        max_delay_s=settings.webhook_backoff_max.total_seconds(),
    )


def deliver_webhook(job_id: str, msg_id: str, attempt: int, waited: int = 0) -> str:
    """RQ entry point (``services.queue.WEBHOOK_TASK``): attempt ``attempt`` of message ``msg_id``
    (``waited``: times it was put back for want of a slot on its receiver's host or its API key's share).

    Retried whole through a Redis outage of up to ``DARKROOM_REDIS_RETRY_DEADLINE``: failing would leave the
    delivery ``pending`` with no next attempt scheduled. If Redis went away after the request was sent,
    the receiver gets it again with the same ``webhook-id`` (at-least-once, as Standard Webhooks expects).
    """
    clients = process_clients()
    return retry_while_redis_down(
        lambda: run_delivery_attempt(DeliveryContext.from_clients(clients), job_id, msg_id, attempt, waited),
        what="webhook delivery attempt",
        deadline_s=clients.settings.redis_retry_deadline.total_seconds(),
    )


def deliver_batch_webhook(batch_id: str, msg_id: str, attempt: int, waited: int = 0) -> str:
    """RQ entry point (``services.queue.BATCH_WEBHOOK_TASK``): attempt ``attempt`` of a batch's message."""
    clients = process_clients()
    ctx = DeliveryContext.from_clients(clients)
    return retry_while_redis_down(
        lambda: run_batch_delivery_attempt(ctx, batch_id, msg_id, attempt, waited),
        what="batch webhook delivery attempt",
        deadline_s=clients.settings.redis_retry_deadline.total_seconds(),
    )


@dataclass(frozen=True)
class Subject:
    """What a message is about — a job or a batch: where its webhook goes and its delivery is kept, how
    its payload reads, and which task makes the next attempt."""

    id: str
    url: str
    payload: Callable[[str, str], bytes]  # (event type, timestamp) -> the bytes to sign and send
    #: Saving a delivery record, as commands added to a pipeline the caller executes:
    #: (pipeline, msg_id, delivery record). ``save_delivery`` runs it on a pipeline of its own.
    stage: Callable[[Any, str, dict[str, Any]], None]
    task: str
    owner: str = "anonymous"  # the API key whose share of the webhook process the attempt counts against


def _payload(event_type: str, timestamp: str, data: dict[str, Any]) -> bytes:
    body = {"type": event_type, "timestamp": timestamp, "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def build_payload(
    record: JobRecord, event_type: str, timestamp: str, storage: Storage, expiry: timedelta
) -> bytes:
    """``{"type", "timestamp", "data": <the job as GET returns it>}`` as the exact bytes to sign and send.

    ``data`` leaves out ``webhook.deliveries``: that bookkeeping describes the webhook itself, changes with
    every attempt, and would already be stale when the receiver reads it.
    """
    job = render_job(record, storage, expiry)
    return _payload(event_type, timestamp, job.model_dump(mode="json", exclude={"webhook": {"deliveries"}}))


def run_delivery_attempt(
    ctx: DeliveryContext, job_id: str, msg_id: str, attempt: int, waited: int = 0
) -> str:
    """Make attempt number ``attempt`` (1-based) for one message, record it, schedule the next if due.

    Returns ``delivered``, ``retrying``, ``failed``, ``gone``, ``waiting`` (the receiver's host or the
    job's API key had no free slot: the attempt was parked until one comes free), or
    ``skipped`` (the job or its delivery record expired, or this attempt already happened: a re-run task
    must not send twice).
    """
    bound = log.bind(job_id=job_id, msg_id=msg_id, attempt=attempt)
    loaded = _job_subject(ctx, job_id, msg_id)
    if loaded is None:
        bound.info("webhook.skipped", reason="job_or_delivery_expired")
        return SKIPPED
    return _attempt(ctx, *loaded, attempt, waited, bound)


def _job_subject(ctx: DeliveryContext, job_id: str, msg_id: str) -> tuple[Subject, dict[str, Any]] | None:
    delivery = ctx.store.get_delivery(job_id, msg_id)
    record = ctx.store.get(job_id)
    if delivery is None or record is None or not record.webhook:
        return None
    return job_subject(ctx, record), delivery


def job_subject(ctx: DeliveryContext, record: JobRecord) -> Subject:
    """The :class:`Subject` of a job whose record (with a webhook) was read already."""
    assert record.webhook is not None
    job_id = record.id
    return Subject(
        id=job_id,
        url=record.webhook["url"],
        payload=lambda event_type, at: build_payload(record, event_type, at, ctx.storage, ctx.url_expiry),
        stage=lambda pipe, msg, entry: ctx.store.put_delivery(job_id, msg, entry, pipe=pipe),
        task=WEBHOOK_TASK,
        owner=record.owner,
    )


def run_batch_delivery_attempt(
    ctx: DeliveryContext, batch_id: str, msg_id: str, attempt: int, waited: int = 0
) -> str:
    """:func:`run_delivery_attempt` for a batch's ``batch.completed``: the payload's ``data`` is the batch
    as ``GET /v1/batches/{id}`` returns it, less its items (read them there) and webhook deliveries."""
    bound = log.bind(batch_id=batch_id, msg_id=msg_id, attempt=attempt)
    loaded = _batch_subject(ctx, batch_id, msg_id)
    if loaded is None:
        bound.info("webhook.skipped", reason="batch_or_delivery_expired")
        return SKIPPED
    return _attempt(ctx, *loaded, attempt, waited, bound)


def _batch_subject(ctx: DeliveryContext, batch_id: str, msg_id: str) -> tuple[Subject, dict[str, Any]] | None:
    batches = ctx.batches or BatchStore(ctx.store.redis)
    delivery = batches.get_delivery(batch_id, msg_id)
    record = batches.get(batch_id)
    if delivery is None or record is None or not record.webhook:
        return None
    return batch_subject(ctx, record), delivery


def batch_subject(ctx: DeliveryContext, batch: BatchRecord) -> Subject:
    """The :class:`Subject` of a batch whose record (with a webhook) was read already."""
    assert batch.webhook is not None
    batches = ctx.batches or BatchStore(ctx.store.redis)
    batch_id = batch.id

    def payload(event_type: str, at: str) -> bytes:
        view = read_batch(batches, batch)
        return _payload(
            event_type, at, view.model_dump(mode="json", exclude={"items", "next_offset", "webhook"})
        )

    return Subject(
        id=batch_id,
        url=batch.webhook["url"],
        payload=payload,
        stage=lambda pipe, msg, entry: batches.put_delivery(
            batch_id, msg, entry, batch.retention_s, pipe=pipe
        ),
        task=BATCH_WEBHOOK_TASK,
        owner=batch.owner,
    )


def _attempt(
    ctx: DeliveryContext,
    subject: Subject,
    delivery: dict[str, Any],
    attempt: int,
    waited: int,
    bound: Any,
) -> str:
    if _already_done(delivery, attempt):
        bound.info("webhook.skipped", reason="already_done", state=delivery.get("state"))
        return SKIPPED
    # Both shares free or neither held (a busy one parks the attempt).
    held: list[tuple[HostLimiter, str]] = []
    try:
        for limiter, name, scope in shares(ctx, subject):
            if not limiter.try_acquire(name):
                return put_back_for_share(
                    ctx, subject, delivery["msg_id"], attempt, waited, scope, name, bound
                )
            held.append((limiter, name))
        return _send(ctx, subject, delivery, attempt, bound)
    finally:
        for limiter, name in held:
            limiter.release(name)


def shares(ctx: DeliveryContext, subject: Subject) -> list[tuple[HostLimiter, str, str]]:
    """The shares an attempt for ``subject`` takes, in this order: its API key's, then its receiver
    host's — each as (limiter, name, scope); one the context does not limit is left out."""
    named = [(ctx.key_limiter, subject.owner, "key"), (ctx.limiter, host_key(subject.url), "host")]
    return [(limiter, name, scope) for limiter, name, scope in named if limiter is not None]


def _already_done(delivery: dict[str, Any], attempt: int) -> bool:
    return delivery.get("state") != "pending" or any(a["attempt"] >= attempt for a in delivery["attempts"])


def put_back_for_share(
    ctx: DeliveryContext,
    subject: Subject,
    msg_id: str,
    attempt: int,
    waited: int,
    scope: str,
    name: str,
    bound: Any,
) -> str:
    """Park the attempt until its share has room (``services.webhooks.parking``): the receiver's host has
    ``per_host`` attempts in flight (``scope`` ``host``), or the subject's API key has ``per_key``
    (``key``); ``name`` is the host's or the key's. A parked attempt costs nothing while it waits; a webhook
    process puts it back on the queue once it has a free slot of that share."""
    parked = ParkedAttempt(
        task=subject.task, subject_id=subject.id, msg_id=msg_id, attempt=attempt, waited=waited + 1
    )
    park(ctx.store.redis, scope, name, parked)
    bound.info(f"webhook.waiting_for_{scope}", waited=waited + 1)
    return WAITING


def _send(ctx: DeliveryContext, subject: Subject, delivery: dict[str, Any], attempt: int, bound: Any) -> str:
    msg_id = delivery["msg_id"]
    event_type: str = delivery["event"]
    try:
        secret = usable_secret(ctx.secret)
        payload = subject.payload(event_type, delivery["created_at"])
    except Exception as exc:
        # Our fault, not the receiver's: say so on the delivery (else it stays "pending" forever) and
        # let RQ keep the failed task for an operator.
        bound.exception("webhook.not_sent", event_type=event_type)
        try:
            record_not_sent(ctx, subject, delivery, attempt, exc)
        except Exception:
            bound.exception("webhook.record_failed")
        raise

    message = WebhookMessage(url=subject.url, event_type=event_type, payload=payload, msg_id=msg_id)
    result = attempt_delivery(
        ctx.client,
        message,
        secret,
        attempt,
        allow_private=ctx.allow_private,
        allow_http=ctx.allow_http,
        clock=ctx.clock,
        resolver=ctx.resolver,
        deadline_s=ctx.deadline_s,
    )
    return conclude_attempt(ctx, subject, delivery, attempt, result.record, result.outcome, bound)


@dataclass(frozen=True)
class Settled:
    """What an attempt's outcome makes of its delivery: the verdict, the delivery's new state, and the
    delay before the next attempt (None: no further attempt)."""

    verdict: Verdict
    state: str
    delay: float | None


def settle_attempt(
    ctx: DeliveryContext,
    delivery: dict[str, Any],
    attempt: int,
    record: DeliveryAttempt,
    outcome: httpx.Response | BaseException,
) -> Settled:
    """Append the attempt to ``delivery`` and set its state (in memory; the caller saves it)."""
    verdict = classify(outcome)
    delay = next_delay(attempt, outcome, ctx.policy, rand=ctx.rand, now=ctx.clock())
    state = _STATES[verdict] if delay is None else "pending"
    _append(delivery, record, state)
    return Settled(verdict, state, delay)


def follow_up(
    ctx: DeliveryContext,
    subject: Subject,
    delivery: dict[str, Any],
    attempt: int,
    record: DeliveryAttempt,
    settled: Settled,
    bound: Any,
) -> str:
    """Once a settled attempt is saved: count and log it, and schedule the next attempt if one is due."""
    WEBHOOK_ATTEMPTS.labels(outcome=settled.verdict.value).inc()
    bound.info(
        "webhook.attempt",
        event_type=delivery["event"],
        status_code=record.status_code,
        error=record.error,
        verdict=settled.verdict.value,
        state=settled.state,
        next_in_s=None if settled.delay is None else round(settled.delay, 3),
    )
    if settled.delay is not None:
        enqueue_attempt(
            ctx.queue,
            subject.id,
            delivery["msg_id"],
            attempt + 1,
            delay=timedelta(seconds=settled.delay),
            timeout=ctx.task_timeout,
            task=subject.task,
        )
        return RETRYING
    return {"delivered": DELIVERED, "gone": GONE}.get(settled.state, FAILED)


def conclude_attempt(
    ctx: DeliveryContext,
    subject: Subject,
    delivery: dict[str, Any],
    attempt: int,
    record: DeliveryAttempt,
    outcome: httpx.Response | BaseException,
    bound: Any,
) -> str:
    """Record the attempt, settle the delivery's state, and schedule the next attempt if one is due."""
    settled = settle_attempt(ctx, delivery, attempt, record, outcome)
    save_delivery(ctx, subject, delivery)
    return follow_up(ctx, subject, delivery, attempt, record, settled, bound)


def attempt_interrupted(
    job: RQJob, connection: Any, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
) -> None:
    """RQ failure callback of every attempt task (``scheduling.ON_FAILURE``): an attempt whose task
    failed — RQ's timeout fired, the process was killed mid-attempt (RQ finds the task abandoned when it
    cleans its registries), or an error of ours — is recorded as an attempt with the reason, and the
    next one is scheduled by the usual policy. Without this such a delivery stayed ``pending`` with no
    attempt recorded and no retry. An attempt that was recorded (sent, or "not sent") is left alone."""
    subject_id, msg_id, attempt = job.args[:3]
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        reason = "the task timed out"
    elif exc_type is not None and issubclass(exc_type, AbandonedJobError):
        reason = "the webhook process stopped during it"
    else:
        reason = f"{exc_type.__name__ if exc_type else 'unknown'} in the task"
    record_interrupted(job.func_name or WEBHOOK_TASK, subject_id, msg_id, attempt, reason, job.started_at)


def record_interrupted(
    task: str, subject_id: str, msg_id: str, attempt: int, reason: str, started: datetime | None
) -> None:
    """Record attempt ``attempt`` as interrupted for ``reason`` and schedule the next by the usual policy,
    unless it was recorded already (sent, or "not sent"). ``task`` says whether the subject is a job
    (``WEBHOOK_TASK``) or a batch (``BATCH_WEBHOOK_TASK``)."""
    ctx = DeliveryContext.from_clients(process_clients())
    load = _batch_subject if task == BATCH_WEBHOOK_TASK else _job_subject
    loaded = load(ctx, subject_id, msg_id)
    bound = log.bind(subject_id=subject_id, msg_id=msg_id, attempt=attempt)
    if loaded is None:
        return
    subject, delivery = loaded
    if _already_done(delivery, attempt):
        return
    now = ctx.clock()
    took_ms = max(0.0, (now - started).total_seconds() * 1000.0) if started is not None else 0.0
    record = DeliveryAttempt(
        at=started or now,
        attempt=attempt,
        status_code=None,
        error=f"attempt interrupted: {reason}",
        duration_ms=took_ms,
    )
    # Retryable like any transport failure: whether the receiver got it is unknown (same webhook-id).
    conclude_attempt(ctx, subject, delivery, attempt, record, httpx.ReadTimeout(record.error or ""), bound)


#: Delivery state once no further attempt is due. A retryable verdict only gets here out of attempts.
_STATES = {
    Verdict.DELIVERED: "delivered",
    Verdict.GONE: "gone",
    Verdict.FAILED: "failed",
    Verdict.RETRY: "failed",
}


def usable_secret(secret: str | None) -> str:
    if secret is None:
        raise WebhookConfigError("DARKROOM_WEBHOOK_SECRET is not set, so webhooks cannot be signed")
    decode_secret(secret)  # ValueError now, rather than from inside attempt_delivery
    return secret


def record_not_sent(
    ctx: DeliveryContext, subject: Subject, delivery: dict[str, Any], attempt: int, exc: BaseException
) -> None:
    """Fail the delivery with an attempt entry saying why we could not even send it (our fault, not the
    receiver's), so users see why rather than a delivery ``pending`` forever."""
    reason = "webhook signing is not configured" if isinstance(exc, WebhookConfigError) else "internal error"
    entry = DeliveryAttempt(
        at=ctx.clock(), attempt=attempt, status_code=None, error=f"not sent: {reason}", duration_ms=0.0
    )
    _append(delivery, entry, "failed")
    save_delivery(ctx, subject, delivery)


def save_delivery(ctx: DeliveryContext, subject: Subject, delivery: dict[str, Any]) -> None:
    """Save ``delivery`` on its own (the subject's ``stage`` on a pipeline of one round trip)."""
    with ctx.store.redis.pipeline(transaction=False) as pipe:
        subject.stage(pipe, delivery["msg_id"], delivery)
        pipe.execute()


def _append(delivery: dict[str, Any], entry: DeliveryAttempt, state: str) -> None:
    """Append ``entry`` and set ``state``. Read-modify-write is safe: a message's attempts run one after
    another (each task enqueues the next), never concurrently."""
    delivery["attempts"] = [*delivery["attempts"], entry.model_dump(mode="json")]
    delivery["state"] = state
