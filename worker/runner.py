"""One generation job, start to finish: claim it, generate, upload, record the outcome, notify.

A plain function over explicit dependencies (the RQ task only gathers them), so it is testable without a
queue. Every way a job can end is written to the job record with a stable error code — the RQ job itself
always finishes normally, so nothing is "lost" in RQ's failed registry without a trace on our side.

Micro-batching: after claiming a text-to-image job, the worker takes up to ``max_batch_size - 1`` more
compatible jobs that are already waiting (``worker.batching``; no waiting for more unless
``batch_linger`` says so) and runs them in one pipeline call. Each job of a batch still has its own
claim, heartbeat, progress, cancel, webhooks and outcome — recorded the moment it is known, guarded by
the worker name, retried through a Redis outage — exactly as a job run alone.
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import structlog
from rq import Queue

from schemas.generation import NORMALIZED_CONTEXT, GenerationRequest
from schemas.jobs import JobStatus
from services import metrics
from services.clients import REDIS_UNAVAILABLE, retry_while_redis_down
from services.content_safety import ImageClassifier, Verdict
from services.jobs import JobRecord, JobStore, Transition, utcnow
from services.storage import Storage, StorageError, StorageUnavailable
from services.storage.keys import image_key
from services.webhooks.events import schedule_batch_event, schedule_webhook_event
from worker import batching
from worker.content_check import check_images
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
    #: Micro-batching: at most this many jobs (and images) in one pipeline call; 1 turns it off.
    max_batch_size: int = 1
    #: How long to wait for batch partners that are not queued yet (0: take only what is waiting).
    batch_linger: timedelta = timedelta(0)
    #: How many waiting jobs, from the front of the queue, are looked at for partners.
    batch_lookahead: int = 16
    #: The generation queue partners are taken from (on a connection with ordinary timeouts).
    generation_queue: Queue | None = None
    #: The batch queue (``POST /v1/batches`` items): a batch item's partners come from it.
    batch_queue: Queue | None = None
    #: ``DARKROOM_IMAGE_CLASSIFIER``, loaded: judges every image before it is stored (None: all pass).
    image_classifier: ImageClassifier | None = None
    #: The served model's name (``Settings.served_model``): the ``model`` label of this worker's metrics.
    model: str = ""
    _held: set[str] = field(default_factory=set, repr=False)
    _held_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hold(self, job_id: str) -> None:
        """``job_id`` runs here now: the heartbeat thread beats it until :meth:`let_go`."""
        with self._held_lock:
            self._held.add(job_id)

    def let_go(self, job_id: str) -> None:
        with self._held_lock:
            self._held.discard(job_id)

    def held_jobs(self) -> set[str]:
        """Jobs claimed by this worker whose outcome is not recorded yet."""
        with self._held_lock:
            return set(self._held)

    def let_go_all(self) -> set[str]:
        """Forget every held job (after a run Redis cut short); returns them, for release."""
        with self._held_lock:
            held, self._held = self._held, set()
            return held

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
    if record.mask_image_key:  # inpainting; read back like the init image (the storage retries reads)
        data = ctx.storage.read(record.mask_image_key)
        request = request.model_copy(update={"mask_image": base64.b64encode(data).decode("ascii")})
    return request


def upload_images(
    ctx: WorkerContext, record: JobRecord, result: GenerationResult, verdicts: list[Verdict] | None = None
) -> list[dict[str, Any]]:
    """Store the images the classifier allowed; a filtered one is listed (``content_filtered``) but never
    uploaded, so its pixels exist nowhere a client could reach."""
    stored: list[dict[str, Any]] = []
    for index, image in enumerate(result.images):
        verdict = verdicts[index] if verdicts is not None else None
        if verdict is not None and not verdict.allowed:
            stored.append(
                {
                    "seed": image.seed,
                    "width": image.width,
                    "height": image.height,
                    "content_type": image.content_type,
                    "finish_reason": "content_filtered",
                    "filter_reason": verdict.reason,
                }
            )
            continue
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
                "finish_reason": "stop",
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
    claimed = _claim(ctx, record)
    if not claimed.applied:
        log.info("job not started", job_id=job_id, status=claimed.previous)
        return f"skipped:{claimed.previous}"
    partners = _take_partners(ctx, record)
    if partners:
        return _run_batch(ctx, [record, *partners])[job_id]
    metrics.JOBS_RUNNING.labels(ctx.model).inc()
    clock = time.perf_counter()
    try:
        status, fields = _generate_and_store(ctx, record)
    finally:
        metrics.JOBS_RUNNING.labels(ctx.model).dec()
    return _finish(ctx, record, status, fields, clock)


def _claim(ctx: WorkerContext, record: JobRecord) -> Transition:
    """QUEUED -> RUNNING under our name (atomic: of all who try, one wins), then the ``started`` webhook."""
    job_id, started_at = record.id, utcnow()
    # heartbeat_at restarts with the claim: a previous run's stale beat must not get this run requeued.
    # batch is cleared: a previous run's batch is not this run's.
    claim = {"started_at": started_at, "heartbeat_at": started_at, "worker": ctx.worker_name, "batch": ""}
    claimed = ctx.with_redis(
        lambda: _transition_once(ctx, job_id, JobStatus.RUNNING, _QUEUED, claim, "started_at"),
        "claim job",
    )
    if claimed.applied:
        ctx.hold(job_id)
        metrics.QUEUE_WAIT.observe((started_at - record.created_at).total_seconds())
        schedule_webhook_event(ctx.store, ctx.webhook_queue, job_id, "started")
    return claimed


def _finish(
    ctx: WorkerContext,
    record: JobRecord,
    status: JobStatus,
    fields: dict[str, Any],
    clock: float,
    *,
    patient: bool = True,
) -> str:
    """Record the job's outcome (only while it is still ours) and send its ``completed`` webhook.

    ``patient``: retry through a Redis outage (up to ``redis_retry_deadline``); else one try, raising
    the Redis error. A retry must pass the same ``fields`` (``completed_at`` included, set here if
    missing), so that it repeats exactly this change.
    """
    job_id = record.id
    fields.setdefault("completed_at", utcnow())

    def run(operation: Callable[[], T], what: str) -> T:
        return ctx.with_redis(operation, what) if patient else operation()

    finished = run(
        lambda: _transition_once(ctx, job_id, status, _RUNNING, fields, "completed_at", guarded=True),
        "record outcome",
    )
    if not finished.applied:  # presumed lost and handed to another worker meanwhile: its result wins
        ctx.let_go(job_id)
        log.warning("result discarded: job no longer ours", job_id=job_id, status=finished.previous)
        return f"discarded:{finished.previous}"
    run(lambda: ctx.store.touch_terminal(job_id), "refresh retention")
    ctx.let_go(job_id)
    metrics.JOBS.labels(status.value).inc()
    metrics.RUN_TIME.labels(status.value).observe(time.perf_counter() - clock)
    schedule_webhook_event(ctx.store, ctx.webhook_queue, job_id, "completed")
    if finished.batch_done:  # this was the last unfinished item of its batch
        schedule_batch_event(ctx.store.redis, ctx.webhook_queue, finished.batch_done)
    log.info("job finished", job_id=job_id, status=status.value, error=fields.get("error"))
    return status.value


def partner_queue(ctx: WorkerContext, leader: JobRecord) -> Queue | None:
    """Partners come from the queue the leader came from: batch items batch with batch items (they share
    a size and steps more often than not), interactive jobs with interactive jobs — so a batch never
    delays an interactive job, nor jumps the interactive queue."""
    return ctx.batch_queue if leader.batch_id else ctx.generation_queue


def _take_partners(ctx: WorkerContext, leader: JobRecord) -> list[JobRecord]:
    """Claim up to ``max_batch_size - 1`` waiting jobs that can share the leader's pipeline call (and at
    most ``max_batch_size`` images in all). Looks only at what is queued now, unless ``batch_linger``."""
    queue = partner_queue(ctx, leader)
    key = batching.record_batch_key(leader)
    room_jobs, room_images = ctx.max_batch_size - 1, ctx.max_batch_size - batching.record_images(leader)
    if queue is None or key is None or room_jobs < 1 or room_images < 1:
        return []
    linger_until = time.monotonic() + ctx.batch_linger.total_seconds()
    seen, partners = {leader.id}, []
    while True:
        try:
            candidates = batching.queued_candidates(ctx.store, queue, ctx.batch_lookahead)
        except REDIS_UNAVAILABLE:
            break
        for candidate in candidates:
            if candidate.job_id in seen or candidate.key != key or candidate.num_images > room_images:
                continue
            seen.add(candidate.job_id)
            record = _claim_partner(ctx, queue, candidate.job_id)
            if record is not None:
                partners.append(record)
                room_jobs -= 1
                room_images -= batching.record_images(record)
                if room_jobs < 1 or room_images < 1:
                    return partners
        remaining = linger_until - time.monotonic()
        if remaining <= 0:
            return partners
        time.sleep(min(0.02, remaining))
    return partners


def _claim_partner(ctx: WorkerContext, queue: Queue, job_id: str) -> JobRecord | None:
    try:
        record = ctx.store.get(job_id)
    except REDIS_UNAVAILABLE:
        return None
    if record is None or record.status is not JobStatus.QUEUED:
        return None
    if not _claim(ctx, record).applied:  # canceled, or another worker's now
        return None
    try:
        batching.take_off_queue(queue, job_id, ctx.worker_name)
    except REDIS_UNAVAILABLE:  # still listed: whoever dequeues it finds it running and skips it
        log.warning("batch partner left on the queue list: redis unavailable", job_id=job_id)
    return record


def _run_batch(ctx: WorkerContext, records: list[JobRecord]) -> dict[str, str]:
    """Run claimed, compatible jobs in one pipeline call; returns each job's final status by id.

    A job canceled mid-batch is recorded ``canceled`` at once (one try; if Redis is away, again with
    retries once the batch is done) while the others go on.
    """
    batch = {"id": "bat_" + secrets.token_hex(6), "size": len(records), "jobs": [r.id for r in records]}
    log.info("batch started", batch_id=batch["id"], job_ids=batch["jobs"])
    for record in records:
        try:
            ctx.store.set_fields(record.id, {"batch": batch})
        except REDIS_UNAVAILABLE:
            pass  # informational: the outcome carries it too
    clock = time.perf_counter()
    done: dict[str, str] = {}
    pending: dict[str, tuple[JobStatus, dict[str, Any]]] = {}

    def canceled_now(record: JobRecord) -> Callable[[GenerationCanceled], None]:
        def on_canceled(error: GenerationCanceled) -> None:
            status, fields = _failure(record.id, error)
            fields.update(batch=batch, completed_at=utcnow())
            pending[record.id] = (status, fields)
            try:
                done[record.id] = _finish(ctx, record, status, fields, clock, patient=False)
            except REDIS_UNAVAILABLE as exc:
                log.warning("cancel not recorded yet: redis unavailable", job_id=record.id, error=str(exc))

        return on_canceled

    metrics.JOBS_RUNNING.labels(ctx.model).inc(len(records))
    try:
        outcomes: list[GenerationResult | Exception]
        try:
            requests = [load_request(ctx, record) for record in records]
            outcomes = list(
                ctx.engine.generate_batch(
                    requests,
                    on_progress=[ProgressReporter(ctx, record) for record in records],
                    should_cancel=[cancel_check(ctx, record.id) for record in records],
                    on_canceled=[canceled_now(record) for record in records],
                )
            )
        except Exception as exc:  # a bug of ours: every job of the batch reports it
            logging.getLogger(__name__).exception("batch %s failed unexpectedly", batch["id"])
            outcomes = [exc] * len(records)
        for record, outcome in zip(records, outcomes, strict=True):
            if record.id in done:
                continue
            if record.id not in pending:
                status, fields = (
                    _store_result(ctx, record, outcome)
                    if isinstance(outcome, GenerationResult)
                    else _failure(record.id, outcome)
                )
                fields.update(batch=batch, completed_at=utcnow())
                pending[record.id] = (status, fields)
            status, fields = pending[record.id]
            done[record.id] = _finish(ctx, record, status, fields, clock)
    finally:
        metrics.JOBS_RUNNING.labels(ctx.model).dec(len(records))
    leader, queue = records[0].id, partner_queue(ctx, records[0])
    assert queue is not None  # partners come from it
    for record in records[1:]:  # RQ ran only the leader; the others' RQ jobs end here
        if not done[record.id].startswith("discarded"):
            try:
                batching.finish_rq_job(queue, record.id, done[record.id], ctx.worker_name)
            except Exception:  # bookkeeping only: the job record has the outcome
                log.warning("rq job of batch partner not marked finished", job_id=record.id, exc_info=True)
    log.info("batch finished", batch_id=batch["id"], leader=leader, outcomes=done)
    return done


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
    try:
        request = load_request(ctx, record)
        result = ctx.engine.generate(
            request,
            on_progress=ProgressReporter(ctx, record),
            should_cancel=cancel_check(ctx, record.id),
        )
    except Exception as exc:
        return _failure(record.id, exc)
    return _store_result(ctx, record, result)


def _failure(job_id: str, exc: Exception) -> tuple[JobStatus, dict[str, Any]]:
    """The status and stable error code of a run that ended in ``exc`` (call inside ``except``)."""
    if isinstance(exc, GenerationCanceled):
        return JobStatus.CANCELED, {"error": {"type": exc.code, "message": str(exc)}}
    if isinstance(exc, EngineError):
        return JobStatus.FAILED, {"error": {"type": exc.code, "message": str(exc)}}
    if isinstance(exc, StorageUnavailable):
        return JobStatus.FAILED, {"error": {"type": "storage_unavailable", "message": str(exc)}}
    if isinstance(exc, StorageError):
        return JobStatus.FAILED, {"error": {"type": "storage_error", "message": str(exc)}}
    # A bug of ours: record it on the job rather than leave it "running".
    logging.getLogger(__name__).error("job %s failed unexpectedly", job_id, exc_info=exc)
    return JobStatus.FAILED, {
        "error": {"type": "internal_error", "message": "internal error; see worker logs"}
    }


def _store_result(
    ctx: WorkerContext, record: JobRecord, result: GenerationResult
) -> tuple[JobStatus, dict[str, Any]]:
    """Classify, then upload the images; the outcome fields of a success, or of the failed check/upload.

    A job whose images were all filtered still succeeds: the run finished, and each image says why it
    has no URL (``finish_reason``); a warning says it too.
    """
    try:
        verdicts = check_images(ctx.image_classifier, record, result.images)
        images = upload_images(ctx, record, result, verdicts)
    except Exception as exc:
        return _failure(record.id, exc)
    withheld = sum(1 for image in images if image["finish_reason"] == "content_filtered")
    metrics.IMAGES.inc(len(images) - withheld)
    warnings = list(result.warnings)
    if withheld:
        metrics.IMAGES_FILTERED.inc(withheld)
        log.info("images withheld by the content filter", job_id=record.id, withheld=withheld)
        warnings.append(
            f"{withheld} of {len(images)} images were withheld by the content filter "
            "(finish_reason content_filtered)"
        )
    return JobStatus.SUCCEEDED, {
        "images": images,
        "warnings": warnings,
        "token_counts": result.token_counts,
        "timings": result.timings,
    }
