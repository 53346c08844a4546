"""Generation jobs as the API manages them: submit (with idempotency), read, cancel.

Plain synchronous functions over :class:`AppState` — routes run them in the threadpool — so the logic is
testable without HTTP and the event loop never waits on Redis round trips.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import cast

import structlog

from api.errors import ApiError, Conflict, NotFound, ServiceUnavailable, UnprocessableRequest
from api.state import AppState
from schemas.images import vet_base64_image
from schemas.jobs import CreateGeneration, Job, JobStatus
from schemas.problems import FieldError
from services import metrics
from services.job_views import render_job
from services.jobs import JobRecord, new_job_id, utcnow
from services.queue import enqueue_generation, queue_position, remove_from_queue
from services.ssrf import UnsafeURLError, vet_url
from services.storage import init_image_key
from services.webhooks.events import schedule_webhook_event

log = structlog.get_logger(__name__)
IDEMPOTENCY_PREFIX = "darkroom:idempotency:"


@dataclass(frozen=True)
class Submission:
    job_id: str
    created: bool  # False when an Idempotency-Key replay returned an existing job


def fingerprint(body: CreateGeneration) -> str:
    """Canonical hash of what the client sent (defaults not filled in), to compare idempotent replays."""
    canonical = json.dumps(body.model_dump(mode="json", exclude_unset=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _webhook_problem(code: str, message: str) -> UnprocessableRequest:
    return UnprocessableRequest(
        message, code=code, errors=[FieldError(field="webhook_url", message=message, type=code)]
    )


def _check_webhook(state: AppState, body: CreateGeneration) -> dict[str, object] | None:
    if body.webhook_url is None:
        return None
    settings = state.settings
    if settings.webhook_secret is None:
        raise _webhook_problem(
            "webhooks_not_configured",
            "this server has no DARKROOM_WEBHOOK_SECRET, so it cannot sign webhooks",
        )
    url = str(body.webhook_url)
    try:
        vet_url(url, allow_private=settings.webhook_allow_private, allow_http=settings.webhook_allow_http)
    except UnsafeURLError as exc:
        raise _webhook_problem("webhook_url_not_allowed", f"webhook_url refused: {exc}") from None
    return {"url": url, "events": list(body.webhook_events)}


def _claim_idempotency_key(state: AppState, key: str, digest: str, job_id: str) -> str | None:
    """Reserve ``key`` for ``job_id``; if it was already taken, return the job it points to.

    SET NX makes two concurrent first uses of a key race safely: exactly one creates a job.
    """
    redis = state.clients.redis
    redis_key = IDEMPOTENCY_PREFIX + hashlib.sha256(key.encode()).hexdigest()
    ttl = int(state.settings.idempotency_ttl.total_seconds())
    value = json.dumps({"job_id": job_id, "fingerprint": digest})
    for _ in range(3):
        if redis.set(redis_key, value, nx=True, ex=ttl):
            return None
        raw = redis.get(redis_key)
        if raw is None:  # expired between the two calls: claim again
            continue
        existing = json.loads(cast(bytes, raw))
        if existing["fingerprint"] != digest:
            raise UnprocessableRequest(
                "this Idempotency-Key was already used with a different request body",
                code="idempotency_key_reused",
            )
        return str(existing["job_id"])
    raise RuntimeError("Idempotency-Key kept expiring while being claimed")


def _check_queue_depth(state: AppState) -> None:
    """Refuse new work while the backlog is at its ceiling: a bounded queue fails fast and visibly."""
    depth = int(state.clients.redis.llen(state.queue.key))
    if depth >= state.settings.max_queue_depth:
        metrics.SUBMISSIONS.labels("queue_full").inc()
        raise ServiceUnavailable(
            f"the queue holds {depth} jobs, its limit; retry later",
            code="queue_full",
            retry_after=max(1, int(state.settings.queue_full_retry_after.total_seconds())),
        )


def _check_rate(state: AppState, principal: str) -> None:
    if state.rate_limiter is None:
        return
    decision = state.rate_limiter.take(principal)
    if not decision.allowed:
        metrics.SUBMISSIONS.labels("rate_limited").inc()
        raise ApiError(
            f"too many submissions for this API key; retry in {decision.retry_after_s} s",
            status=429,
            code="rate_limited",
            headers={"Retry-After": str(decision.retry_after_s)},
        )


def submit(
    state: AppState, principal: str, body: CreateGeneration, idempotency_key: str | None
) -> Submission:
    webhook = _check_webhook(state, body)
    job_id = new_job_id()
    if idempotency_key is not None:
        # Keys are scoped to their API key: two clients may pick the same Idempotency-Key independently.
        scoped_key = f"{principal}\x00{idempotency_key}"
        existing = _claim_idempotency_key(state, scoped_key, fingerprint(body), job_id)
        if existing is not None:
            metrics.SUBMISSIONS.labels("idempotent_replay").inc()
            return Submission(job_id=existing, created=False)
    _check_rate(state, principal)
    _check_queue_depth(state)
    request = body.generation_request().normalized()
    created_at = utcnow()
    init_key = None
    if request.init_image is not None:
        vetted = vet_base64_image(request.init_image)
        init_key = init_image_key(job_id, vetted.format.lower().replace("jpeg", "jpg"), created_at)
        state.clients.storage.put(init_key, vetted.data, f"image/{vetted.format.lower()}")
    record = JobRecord(
        id=job_id,
        status=JobStatus.QUEUED,
        created_at=created_at,
        request=request.model_dump(mode="json", exclude={"init_image"}),
        webhook=webhook,
        init_image_key=init_key,
        owner=principal,
    )
    store = state.clients.store
    store.create(record)
    try:
        enqueue_generation(state.queue, job_id, state.settings)
    except Exception:
        store.transition(
            job_id,
            JobStatus.FAILED,
            allowed_from=(JobStatus.QUEUED,),
            fields={"error": {"type": "enqueue_failed", "message": "the job could not be queued"}},
        )
        raise
    metrics.SUBMISSIONS.labels("accepted").inc()
    log.info("job submitted", job_id=job_id, seed=request.seed, size=f"{request.width}x{request.height}")
    return Submission(job_id=job_id, created=True)


def load(state: AppState, principal: str, job_id: str) -> JobRecord:
    """The job if it exists *and belongs to the caller*; both misses are the same 404 (no enumeration)."""
    record = state.clients.store.get(job_id)
    if record is None or record.owner != principal:
        raise NotFound(f"no generation job {job_id!r}")
    return record


def view(state: AppState, principal: str, job_id: str) -> Job:
    """The public job, with URLs signed now and the current queue position."""
    record = load(state, principal, job_id)
    position = None
    if record.status is JobStatus.QUEUED:
        position = queue_position(state.clients.redis, state.queue, job_id)
    deliveries = state.clients.store.deliveries(job_id) if record.webhook else None
    return render_job(
        record,
        state.clients.storage,
        state.settings.url_expiry,
        queue_position=position,
        deliveries=deliveries,
    )


def cancel(state: AppState, principal: str, job_id: str) -> Job:
    """Queued: canceled at once. Running: interrupted at the next denoising step. Finished: 409."""
    store = state.clients.store
    record = load(state, principal, job_id)
    if record.status.is_terminal:
        raise Conflict(f"job {job_id} is already {record.status.value}", code="job_already_finished")
    if record.status is JobStatus.QUEUED:
        done = store.transition(
            job_id,
            JobStatus.CANCELED,
            allowed_from=(JobStatus.QUEUED,),
            fields={
                "completed_at": utcnow(),
                "error": {"type": "canceled", "message": "canceled while queued"},
            },
        )
        if done.applied:
            remove_from_queue(state.clients.redis, state.queue, job_id)
            store.touch_terminal(job_id)
            metrics.JOBS.labels(JobStatus.CANCELED.value).inc()
            schedule_webhook_event(store, state.webhook_queue, job_id, "completed")
            return view(state, principal, job_id)
        if done.previous is not None and done.previous.is_terminal:
            raise Conflict(f"job {job_id} is already {done.previous.value}", code="job_already_finished")
    store.request_cancel(job_id)  # running (or just started): the worker stops at the next step
    return view(state, principal, job_id)
