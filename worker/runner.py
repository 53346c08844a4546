"""The worker's one run path: a group of N >= 1 claimed jobs — load, generate, check, upload, finish.

``execute_generation`` is what RQ runs for the job it dequeued: claim it, take along the compatible jobs
waiting behind it when coalescing is on (``worker.coalescing``; N = 1 otherwise, or when nothing can
share the call), then :func:`run_group`. Each job of a group keeps its own claim, heartbeat, progress,
cancel, outcome and events; a failure that concerns one job (its init image cannot be read, it was
canceled, its upload failed) ends that job alone.

Every status change is asked of the lifecycle (``services.jobs.lifecycle``), which records it with its
events; this module only decides *which* outcome a run had. The RQ job itself always finishes normally,
so nothing is "lost" in RQ's failed registry without a trace on our side.

Redis may restart under a running job: progress writes and cancel checks are skipped meanwhile, and the
claim and the outcome are retried for up to ``redis_retry_deadline``. Past that the error propagates and
the worker puts the job back once Redis answers (``worker.service.GenerationWorker``).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import structlog
from rq import Queue
from rq.timeouts import JobTimeoutException

from schemas.generation import NORMALIZED_CONTEXT, GenerationRequest
from schemas.jobs import JobErrorCode
from schemas.webhooks import WebhookEvent
from services import metrics, rq_records
from services.clients import REDIS_UNAVAILABLE, retry_while_redis_down
from services.content_safety import ImageClassifier, Verdict
from services.jobs import JobRecord, JobStore, Lifecycle, Transition, utcnow
from services.jobs.outcome import Canceled, Failed, Outcome, Succeeded
from services.storage import Storage, StorageError, StorageUnavailable, StorageWriteRefused
from services.storage.keys import image_key
from worker import coalescing
from worker.cancel_watch import CancelWatch
from worker.coalescing import Coalescing
from worker.content_check import check_images
from worker.engine import GenerationEngine, GenerationResult
from worker.errors import EngineError, GenerationCanceled

T = TypeVar("T")
log = structlog.get_logger(__name__)
PROGRESS_WEBHOOK_INTERVAL_S = 1.0  # progress webhooks are throttled harder than progress writes


@dataclass
class WorkerContext:
    engine: GenerationEngine
    store: JobStore
    lifecycle: Lifecycle
    storage: Storage
    worker_name: str
    progress_interval: timedelta
    #: How long to keep retrying the writes a job cannot do without (claim, outcome) while Redis is away.
    redis_retry_deadline: timedelta = timedelta(seconds=60)
    coalescing: Coalescing = field(default_factory=Coalescing)
    #: ``DARKROOM_IMAGE_CLASSIFIER``, loaded: judges every image before it is stored (None: all pass).
    image_classifier: ImageClassifier | None = None
    #: The served model's name (``Settings.served_model``): the ``model`` label of this worker's metrics.
    model: str = ""
    #: Cancel requests pushed to this worker (None: the flag is read from Redis at every step).
    cancels: CancelWatch | None = None
    _held: set[str] = field(default_factory=set, repr=False)
    _held_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hold(self, job_id: str, *, cancel_requested: bool | None = None) -> None:
        """``job_id`` runs here now: the heartbeat thread beats it and its cancel requests are watched
        (``cancel_requested``: its flag as the claim read it; None: not known, read it) until
        :meth:`let_go`."""
        with self._held_lock:
            self._held.add(job_id)
        if self.cancels is not None:
            self.cancels.watch(job_id, cancel_requested)

    def let_go(self, job_id: str) -> None:
        """``job_id`` is not (or no longer) ours to run: no beat, no cancel watch."""
        with self._held_lock:
            self._held.discard(job_id)
        if self.cancels is not None:
            self.cancels.forget(job_id)

    def held_jobs(self) -> set[str]:
        """Jobs claimed by this worker whose outcome is not recorded yet."""
        with self._held_lock:
            return set(self._held)

    def with_redis(self, operation: Callable[[], T], what: str) -> T:
        """``operation()``, retried through a Redis outage of up to ``redis_retry_deadline``."""
        deadline_s = self.redis_retry_deadline.total_seconds()
        return retry_while_redis_down(operation, what=what, deadline_s=deadline_s)


# --- the run path ------------------------------------------------------------------------------------------


def execute_generation(ctx: WorkerContext, job_id: str) -> str:
    """Run job ``job_id`` (and the partners coalescing takes along); its final status, or why it was
    skipped, for RQ's result.

    The claim reads the record back (``Lifecycle.claim``): no read of the job before it."""
    claimed = claim(ctx, job_id)
    if claimed.previous is None:
        log.warning("job record missing; expired or never created", job_id=job_id)
        return "missing"
    if not claimed.applied:
        log.info("job not started", job_id=job_id, status=claimed.previous)
        return f"skipped:{claimed.previous}"
    record = claimed.record
    if record is None:  # claimed, but unreadable (logged): no job, as for every reader
        return "missing"
    partners = coalescing.take_partners(
        ctx.store, ctx.coalescing, record, lambda job_id, q: _claim_partner(ctx, job_id, q)
    )
    outcomes = run_group(ctx, [record, *partners])
    _close_partner_rq_jobs(ctx, record, partners, outcomes)
    return outcomes[job_id]


def run_group(ctx: WorkerContext, records: list[JobRecord]) -> dict[str, str]:
    """Load, generate, check, upload and finish a group of claimed jobs; each one's final status by id."""
    finished: dict[str, str] = {}
    if len(records) > 1:
        log.info("coalesced call", job_ids=[record.id for record in records])
    metrics.JOBS_RUNNING.labels(ctx.model).inc(len(records))
    try:
        # 1. Load: each job's request, with its init image and mask read back from storage.
        loaded: list[tuple[JobRecord, GenerationRequest]] = []
        for record in records:
            try:
                loaded.append((record, load_request(ctx, record)))
            except Exception as exc:
                finished[record.id] = finish(ctx, record, failure(record.id, exc))
        # 2. Generate: one pipeline call (a job canceled mid-call is finished the moment it is known).
        canceled: dict[str, Outcome] = {}
        outcomes = _generate(ctx, loaded, canceled, finished) if loaded else []
        # 3-5. Check, upload, finish: each job on its own.
        for (record, _), outcome in zip(loaded, outcomes, strict=True):
            if record.id in finished:
                continue
            result = canceled.get(record.id) or (
                store_result(ctx, record, outcome)
                if isinstance(outcome, GenerationResult)
                else failure(record.id, outcome)
            )
            finished[record.id] = finish(ctx, record, result)
    finally:
        metrics.JOBS_RUNNING.labels(ctx.model).dec(len(records))
    return finished


def _generate(
    ctx: WorkerContext,
    loaded: list[tuple[JobRecord, GenerationRequest]],
    canceled: dict[str, Outcome],
    finished: dict[str, str],
) -> list[GenerationResult | Exception]:
    def on_canceled(record: JobRecord) -> Callable[[GenerationCanceled], None]:
        def record_now(error: GenerationCanceled) -> None:
            canceled[record.id] = outcome = Canceled(str(error))
            try:  # one try: if Redis is away, it is recorded with retries after the call
                finished[record.id] = finish(ctx, record, outcome, patient=False)
            except REDIS_UNAVAILABLE as exc:
                log.warning("cancel not recorded yet: redis unavailable", job_id=record.id, error=str(exc))

        return record_now

    try:
        return list(
            ctx.engine.generate_group(
                [request for _, request in loaded],
                on_progress=[ProgressReporter(ctx, record) for record, _ in loaded],
                should_cancel=[cancel_check(ctx, record.id) for record, _ in loaded],
                on_canceled=[on_canceled(record) for record, _ in loaded],
            )
        )
    except Exception as exc:  # a bug of ours: every job of the call reports it
        logging.getLogger(__name__).exception("generation failed unexpectedly for %d job(s)", len(loaded))
        return [exc] * len(loaded)


# --- the steps ---------------------------------------------------------------------------------------------


def claim(
    ctx: WorkerContext, job_id: str, *, rq: rq_records.RqChange | None = None, patient: bool = True
) -> Transition:
    """QUEUED -> RUNNING under our name, with the record as the claim left it (``Transition.record``);
    the job is then held: beaten, and its cancel requests watched from the flag the claim read.
    ``patient``: retried through a Redis outage (else one try, raising the Redis error). ``rq``: RQ's
    side for a job RQ did not hand us.

    The cancel watch expects the job *before* the claim: a request made the moment after it is published
    to us at once, and must not be dropped as a stranger's before the job is watched.

    A claimed record that cannot be read (``JobRecord.from_stored`` logs it) is no job, as for every
    reader: not held, so never beaten, and lost-job recovery drops it as it drops an expired record."""
    at = utcnow()

    def claim_once() -> Transition:
        return ctx.lifecycle.claim(job_id, ctx.worker_name, at=at, rq=rq)

    if ctx.cancels is not None:
        ctx.cancels.expect(job_id)
    try:
        claimed = ctx.with_redis(claim_once, "claim job") if patient else claim_once()
    except BaseException:
        ctx.let_go(job_id)
        raise
    if claimed.applied and claimed.record is not None:
        ctx.hold(job_id, cancel_requested=claimed.record.cancel_requested)
    else:
        ctx.let_go(job_id)
    return claimed


def _claim_partner(ctx: WorkerContext, job_id: str, queue: Queue) -> JobRecord | None:
    """Claim a waiting job as a coalescing partner: one try, taking it off RQ's list in the same step;
    its record if it became ours."""
    try:
        claimed = claim(ctx, job_id, rq=rq_records.taken_by(queue, job_id, ctx.worker_name), patient=False)
    except REDIS_UNAVAILABLE:
        return None
    return claimed.record if claimed.applied else None


def load_request(ctx: WorkerContext, record: JobRecord) -> GenerationRequest:
    request = GenerationRequest.model_validate(record.request, context=NORMALIZED_CONTEXT)
    if record.init_image_key:
        data = ctx.storage.read(record.init_image_key)
        request = request.model_copy(update={"init_image": base64.b64encode(data).decode("ascii")})
    if record.mask_image_key:  # inpainting; read back like the init image (the storage retries reads)
        data = ctx.storage.read(record.mask_image_key)
        request = request.model_copy(update={"mask_image": base64.b64encode(data).decode("ascii")})
    return request


class ProgressReporter:
    """Writes progress at most every ``progress_interval`` (always the last step), with a
    ``generation.progress`` event at most every second when the webhook asked for them; times each step."""

    def __init__(self, ctx: WorkerContext, record: JobRecord) -> None:
        self.ctx, self.job_id = ctx, record.id
        self.interval_s = ctx.progress_interval.total_seconds()
        self.webhook_interval_s = (
            PROGRESS_WEBHOOK_INTERVAL_S if record.subscribes(WebhookEvent.GENERATION_PROGRESS) else None
        )
        self._last_write = self._last_webhook = float("-inf")
        self._last_step_at = time.perf_counter()

    def __call__(self, step: int, total: int) -> None:
        now = time.perf_counter()
        metrics.STEP_TIME.observe(now - self._last_step_at)
        self._last_step_at = now
        notify = self.webhook_interval_s is not None and now - self._last_webhook >= self.webhook_interval_s
        if not (notify or step == total or now - self._last_write >= self.interval_s):
            return
        try:
            self.ctx.lifecycle.progress(self.job_id, self.ctx.worker_name, step, total, notify=notify)
        except REDIS_UNAVAILABLE as exc:  # progress is best effort: a Redis blip must not stop the GPU
            log.warning("progress not recorded: redis unavailable", job_id=self.job_id, error=str(exc))
        self._last_write = now
        if notify:
            self._last_webhook = now


def cancel_check(ctx: WorkerContext, job_id: str) -> Callable[[], bool]:
    """``should_cancel`` for the engine: pushed requests when the worker watches its cancel channel
    (``ctx.cancels``: no Redis command per step), else a read of the flag; while Redis cannot be asked,
    the answer is "keep going"."""
    cancels = ctx.cancels
    if cancels is not None:
        return lambda: cancels.requested(job_id)

    def should_cancel() -> bool:
        try:
            return ctx.lifecycle.cancel_requested(job_id)
        except REDIS_UNAVAILABLE:
            return False

    return should_cancel


def store_result(ctx: WorkerContext, record: JobRecord, result: GenerationResult) -> Outcome:
    """Classify, then upload the images: the outcome of a success, or of the failed check or upload.

    A job whose images were all filtered still succeeds: the run finished, and each image says why it
    has no URL (``finish_reason``); a warning says it too.
    """
    try:
        verdicts = check_images(ctx.image_classifier, record, result.images)
        images = upload_images(ctx, record, result, verdicts)
    except Exception as exc:
        return failure(record.id, exc)
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
    return Succeeded(
        images=images, warnings=warnings, token_counts=result.token_counts, timings=result.timings
    )


def upload_images(
    ctx: WorkerContext, record: JobRecord, result: GenerationResult, verdicts: list[Verdict] | None = None
) -> list[dict[str, Any]]:
    """Store the images the classifier allowed; a filtered one is listed (``content_filtered``) but never
    uploaded, so its pixels exist nowhere a client could reach."""
    stored: list[dict[str, Any]] = []
    for index, image in enumerate(result.images):
        verdict = verdicts[index] if verdicts is not None else None
        described = {"seed": image.seed, "width": image.width, "height": image.height}
        if verdict is not None and not verdict.allowed:
            stored.append(
                {
                    **described,
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
                **described,
                "content_type": image.content_type,
                "sha256": image.sha256,
                "finish_reason": "stop",
            }
        )
    return stored


def failure(job_id: str, exc: Exception) -> Outcome:
    """The outcome of a run that ended in ``exc``: each failure kind has its stable error code."""
    if isinstance(exc, GenerationCanceled):
        return Canceled(str(exc))
    if isinstance(exc, JobTimeoutException):  # RQ's job_timeout fired inside the run
        return Failed(JobErrorCode.TIMED_OUT, f"ran longer than the job timeout: {exc}")
    if isinstance(exc, EngineError):
        return Failed(JobErrorCode(exc.code), str(exc))
    if isinstance(exc, StorageUnavailable):
        return Failed(JobErrorCode.STORAGE_UNAVAILABLE, str(exc))
    if isinstance(exc, StorageWriteRefused):  # a full disk: the operator must act; every job fails now
        metrics.STORAGE_WRITES_REFUSED.labels(exc.reason).inc()
        log.error("storage refuses writes", job_id=job_id, reason=exc.reason, error=str(exc))
    if isinstance(exc, StorageError):
        return Failed(JobErrorCode.STORAGE_ERROR, str(exc))
    # A bug of ours: record it on the job rather than leave it "running".
    logging.getLogger(__name__).error("job %s failed unexpectedly", job_id, exc_info=exc)
    return Failed(JobErrorCode.INTERNAL_ERROR, "internal error; see worker logs")


def finish(ctx: WorkerContext, record: JobRecord, outcome: Outcome, *, patient: bool = True) -> str:
    """Ask the lifecycle to record the outcome (only while the job is still ours); the final status.

    ``patient``: retry through a Redis outage (up to ``redis_retry_deadline``); else one try, raising the
    Redis error. Retries repeat exactly this change (one completion time), so a retry whose first reply
    was lost with the connection is recognised as already recorded.
    """
    at = utcnow()

    def record_outcome() -> Transition:
        return ctx.lifecycle.finish(record, ctx.worker_name, outcome, at=at)

    done = ctx.with_redis(record_outcome, "record outcome") if patient else record_outcome()
    ctx.let_go(record.id)
    if not done.applied:  # presumed lost and handed to another worker meanwhile: its result wins
        log.warning("result discarded: job no longer ours", job_id=record.id, status=done.previous)
        return f"discarded:{done.previous}"
    error = outcome.code.value if isinstance(outcome, Failed) else None
    log.info("job finished", job_id=record.id, status=outcome.status.value, error=error)
    return outcome.status.value


def _close_partner_rq_jobs(
    ctx: WorkerContext, leader: JobRecord, partners: list[JobRecord], outcomes: dict[str, str]
) -> None:
    """RQ ran only the leader; the partners' RQ jobs end here, as RQ would end them."""
    queue = ctx.coalescing.queue_of(leader)
    for record in partners:
        if queue is None or outcomes[record.id].startswith("discarded"):
            continue
        try:
            rq_records.finish_taken_job(queue, record.id, outcomes[record.id], ctx.worker_name)
        except Exception:  # bookkeeping only: the job record has the outcome
            log.warning("rq job of a coalesced partner not marked finished", job_id=record.id, exc_info=True)
