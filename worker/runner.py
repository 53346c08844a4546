"""One generation job, start to finish: claim it, generate, upload, record the outcome, notify.

A plain function over explicit dependencies (the RQ task only gathers them), so it is testable without a
queue. Every way a job can end is written to the job record with a stable error code — the RQ job itself
always finishes normally, so nothing is "lost" in RQ's failed registry without a trace on our side.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import structlog
from rq import Queue

from schemas.generation import NORMALIZED_CONTEXT, GenerationRequest
from schemas.jobs import JobStatus
from services import metrics
from services.clients import REDIS_UNAVAILABLE, retry_while_redis_down
from services.jobs import JobRecord, JobStore, Transition, utcnow
from services.storage import Storage, StorageError, StorageUnavailable
from services.storage.keys import image_key
from services.webhooks.events import schedule_webhook_event
from worker.engine import GenerationEngine, GenerationResult
from worker.errors import EngineError, GenerationCanceled

T = TypeVar("T")
log = structlog.get_logger(__name__)
_QUEUED = (JobStatus.QUEUED,)
_RUNNING = (JobStatus.RUNNING,)
PROGRESS_WEBHOOK_INTERVAL_S = 1.0  # progress webhooks are throttled harder than progress writes


@dataclass
class WorkerContext:
    engine: GenerationEngine
    store: JobStore
    storage: Storage
    webhook_queue: Queue
    worker_name: str
    progress_interval: timedelta
    #: How long to keep retrying the writes a job cannot do without (claim, outcome) while Redis is away.
    redis_retry_deadline: timedelta = timedelta(seconds=60)

    def with_redis(self, operation: Callable[[], T], what: str) -> T:
        """``operation()``, retried through a Redis outage of up to ``redis_retry_deadline``."""
        deadline_s = self.redis_retry_deadline.total_seconds()
        return retry_while_redis_down(operation, what=what, deadline_s=deadline_s)


class ProgressReporter:
    """Writes progress at most every ``interval`` (always the last step) and times each step."""

    def __init__(self, ctx: WorkerContext, record: JobRecord) -> None:
        self.ctx, self.job_id = ctx, record.id
        self.interval_s = ctx.progress_interval.total_seconds()
        wants_progress = bool(record.webhook) and "progress" in (record.webhook or {}).get("events", [])
        self.webhook_interval_s = PROGRESS_WEBHOOK_INTERVAL_S if wants_progress else None
        self._last_write = self._last_webhook = float("-inf")
        self._last_step_at = time.perf_counter()

    def __call__(self, step: int, total: int) -> None:
        now = time.perf_counter()
        metrics.STEP_TIME.observe(now - self._last_step_at)
        self._last_step_at = now
        if step == total or now - self._last_write >= self.interval_s:
            try:
                self.ctx.store.set_progress(self.job_id, step, total)
            except REDIS_UNAVAILABLE as exc:  # progress is best effort: a Redis blip must not stop the GPU
                log.warning("progress not recorded: redis unavailable", job_id=self.job_id, error=str(exc))
            self._last_write = now
        if self.webhook_interval_s is not None and now - self._last_webhook >= self.webhook_interval_s:
            schedule_webhook_event(self.ctx.store, self.ctx.webhook_queue, self.job_id, "progress")
            self._last_webhook = now


def load_request(ctx: WorkerContext, record: JobRecord) -> GenerationRequest:
    request = GenerationRequest.model_validate(record.request, context=NORMALIZED_CONTEXT)
    if record.init_image_key:
        data = ctx.storage.read(record.init_image_key)
        request = request.model_copy(update={"init_image": base64.b64encode(data).decode("ascii")})
    return request


def upload_images(ctx: WorkerContext, record: JobRecord, result: GenerationResult) -> list[dict[str, Any]]:
    stored = []
    for index, image in enumerate(result.images):
        key = image_key(record.id, index, image.extension, record.created_at)
        ctx.storage.put(key, image.data, image.content_type)
        stored.append(
            {
                "key": key,
                "seed": image.seed,
                "width": image.width,
                "height": image.height,
                "content_type": image.content_type,
                "sha256": image.sha256,
            }
        )
    return stored


def cancel_check(ctx: WorkerContext, job_id: str) -> Callable[[], bool]:
    """``should_cancel`` for the engine: while Redis cannot be asked, the answer is "keep going"."""

    def should_cancel() -> bool:
        try:
            return ctx.store.cancel_requested(job_id)
        except REDIS_UNAVAILABLE:
            return False

    return should_cancel


def execute_generation(ctx: WorkerContext, job_id: str) -> str:
    """Run job ``job_id``; returns its final status (or why it was skipped) for RQ's result.

    Redis may restart under a running job: progress writes and cancel checks are skipped meanwhile, and
    the claim and the outcome are retried for up to ``ctx.redis_retry_deadline``. Past that the error
    propagates and the worker puts the job back once Redis answers (``GenerationWorker``).
    """
    record = ctx.with_redis(lambda: ctx.store.get(job_id), "read job")
    if record is None:
        log.warning("job record missing; expired or never created", job_id=job_id)
        return "missing"
    started_at = utcnow()
    # heartbeat_at restarts with the claim: a previous run's stale beat must not get this run requeued.
    claim = {"started_at": started_at, "heartbeat_at": started_at, "worker": ctx.worker_name}
    claimed = ctx.with_redis(
        lambda: _transition_once(ctx, job_id, JobStatus.RUNNING, _QUEUED, claim, "started_at"),
        "claim job",
    )
    if not claimed.applied:
        log.info("job not started", job_id=job_id, status=claimed.previous)
        return f"skipped:{claimed.previous}"
    metrics.QUEUE_WAIT.observe((started_at - record.created_at).total_seconds())
    schedule_webhook_event(ctx.store, ctx.webhook_queue, job_id, "started")
    metrics.JOBS_RUNNING.inc()
    clock = time.perf_counter()
    try:
        status, fields = _generate_and_store(ctx, record)
    finally:
        metrics.JOBS_RUNNING.dec()
    fields["completed_at"] = utcnow()
    finished = ctx.with_redis(
        lambda: _transition_once(ctx, job_id, status, _RUNNING, fields, "completed_at", guarded=True),
        "record outcome",
    )
    if not finished.applied:  # presumed lost and handed to another worker meanwhile: its result wins
        log.warning("result discarded: job no longer ours", job_id=job_id, status=finished.previous)
        return f"discarded:{finished.previous}"
    ctx.with_redis(lambda: ctx.store.touch_terminal(job_id), "refresh retention")
    metrics.JOBS.labels(status.value).inc()
    metrics.RUN_TIME.labels(status.value).observe(time.perf_counter() - clock)
    schedule_webhook_event(ctx.store, ctx.webhook_queue, job_id, "completed")
    log.info("job finished", job_id=job_id, status=status.value, error=fields.get("error"))
    return status.value


def _transition_once(
    ctx: WorkerContext,
    job_id: str,
    to: JobStatus,
    allowed_from: tuple[JobStatus, ...],
    fields: dict[str, Any],
    stamp: str,
    *,
    guarded: bool = False,
) -> Transition:
    """A status change of ours (``guarded``: only while the job is still ours), safe to repeat.

    If an earlier try did apply but its reply was lost with the connection, the job already holds exactly
    this change — our worker name and our ``stamp`` timestamp (``started_at``/``completed_at``) — and that
    counts as applied rather than as someone else's.
    """
    at = fields[stamp]
    guard = ("worker", ctx.worker_name) if guarded else None
    done = ctx.store.transition(job_id, to, allowed_from=allowed_from, fields=fields, at=at, guard=guard)
    if not done.applied and done.previous is to:
        record = ctx.store.get(job_id)
        if record is not None and record.worker == ctx.worker_name and getattr(record, stamp) == at:
            return Transition(applied=True, previous=allowed_from[0])
    return done


def _generate_and_store(ctx: WorkerContext, record: JobRecord) -> tuple[JobStatus, dict[str, Any]]:
    """The part that can fail: each failure kind maps to its status and stable error code."""
    job_id = record.id
    try:
        request = load_request(ctx, record)
        result = ctx.engine.generate(
            request,
            on_progress=ProgressReporter(ctx, record),
            should_cancel=cancel_check(ctx, job_id),
        )
        images = upload_images(ctx, record, result)
    except GenerationCanceled as exc:
        return JobStatus.CANCELED, {"error": {"type": exc.code, "message": str(exc)}}
    except EngineError as exc:
        return JobStatus.FAILED, {"error": {"type": exc.code, "message": str(exc)}}
    except StorageUnavailable as exc:
        return JobStatus.FAILED, {"error": {"type": "storage_unavailable", "message": str(exc)}}
    except StorageError as exc:
        return JobStatus.FAILED, {"error": {"type": "storage_error", "message": str(exc)}}
    except Exception:  # a bug of ours: record it on the job rather than leave it "running"
        logging.getLogger(__name__).exception("job %s failed unexpectedly", job_id)
        return JobStatus.FAILED, {
            "error": {"type": "internal_error", "message": "internal error; see worker logs"}
        }
    metrics.IMAGES.inc(len(images))
    return JobStatus.SUCCEEDED, {
        "images": images,
        "warnings": result.warnings,
        "token_counts": result.token_counts,
        "timings": result.timings,
    }
