"""Generation jobs as the API manages them: submit (with idempotency), read, cancel.

Submitting and reading are coroutines on the API's async Redis client: a submission is one admission
script (``services/admission.py``) and a read one pipelined round trip, without handing the request to a
thread and back. Only work that blocks by nature — resolving a webhook host, uploading an init image,
cancel's status changes through the sync lifecycle — goes to the threadpool, and only when the request
needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import structlog
from fastapi.concurrency import run_in_threadpool
from redis.asyncio.client import Pipeline

from api.errors import Conflict, NotFound, UnprocessableRequest
from api.limits import give_back_submission
from api.riders import Rider
from api.state import AppState
from api.submissions import idempotency_claim, refusal, replayed, served_line, vetted_webhook
from schemas.generation import GenerationRequest
from schemas.images import vet_base64_image
from schemas.jobs import CreateGeneration, Job, JobStatus
from schemas.problems import FieldError
from services import metrics, queue_order
from services.admission import key_share
from services.job_views import render_job
from services.jobs import JobRecord, decode_deliveries, job_key, new_job_id, utcnow, webhooks_key
from services.jobs.archive import ArchivedJob
from services.jobs.keys import is_job_id
from services.queue import job_queue
from services.rq_records import queue_position_async, remove_from_queue
from services.storage import Storage, StorageError, init_image_key, mask_image_key

log = structlog.get_logger(__name__)
IDEMPOTENCY_PREFIX = "darkroom:idempotency:"


@dataclass(frozen=True)
class Submission:
    job_id: str
    created: bool  # False when an Idempotency-Key replay returned an existing job
    job: Job | None = None  # the new job as admitted (None for a replay: read it)
    retry_after: int | None = None  # the polling hint for ``job`` (services.queue_order)


def _store_init_image(
    state: AppState, job_id: str, encoded: str, record_time: Any, *, mask: bool = False
) -> str:
    """Decode an init image (or, ``mask``, an inpainting mask) fully — validation only read its header —
    and upload it beside the job's outputs; its key. 422 naming the field if it does not decode."""
    try:
        vetted = vet_base64_image(encoded)
    except ValueError as exc:
        field = "mask_image" if mask else "init_image"
        raise UnprocessableRequest(
            f"{field}: {exc}",
            code="validation_error",
            errors=[FieldError(field=field, message=str(exc), type="value_error")],
        ) from None
    make_key = mask_image_key if mask else init_image_key
    key = make_key(job_id, vetted.format.lower().replace("jpeg", "jpg"), record_time)
    state.clients.storage.put(key, vetted.data, f"image/{vetted.format.lower()}")
    return key


def _forget_init_image(state: AppState, *keys: str | None) -> None:
    """Best effort: input images uploaded for a submission that was then refused or replayed."""
    for key in keys:
        if key is None:
            continue
        try:
            state.clients.storage.delete(key)
        except StorageError as exc:
            log.warning("orphaned input image not deleted", key=key, error=str(exc))


def check_prompt(state: AppState, request: GenerationRequest) -> None:
    """Refuse a request whose prompt (or, if configured, negative prompt) holds a blocklisted term: 422
    ``content_filtered`` naming the field. The matched term is logged, never echoed: the answer must not
    let a client read the blocklist out one probe at a time."""
    blocked = state.prompt_filter.check_request(request)
    if blocked is None:
        return
    field, term = blocked
    metrics.SUBMISSIONS.labels("content_filtered").inc()
    log.info("submission refused by the prompt filter", field=field, term=term)
    message = f"{field} contains a term this service does not accept"
    raise UnprocessableRequest(
        f"The request was refused by the content filter: {message}.",
        code="content_filtered",
        errors=[FieldError(field=field, message=message, type="content_filtered")],
    )


def check_loras(state: AppState, request: GenerationRequest) -> None:
    """Refuse LoRA adapters this server does not offer (``DARKROOM_LORAS``): 422 ``lora_not_found``
    naming each one's field (``loras.0.name``) and listing what is offered."""
    offered = state.settings.loras
    unknown = [(index, lora.name) for index, lora in enumerate(request.loras) if lora.name not in offered]
    if not unknown:
        return
    choice = f"this server offers: {', '.join(sorted(offered))}" if offered else "this server offers none"
    errors = [
        FieldError(
            field=f"loras.{index}.name", message=f"unknown LoRA {name!r}; {choice}", type="lora_not_found"
        )
        for index, name in unknown
    ]
    raise UnprocessableRequest(errors[0].message, code="lora_not_found", errors=errors)


async def submit(
    state: AppState,
    principal: str,
    body: CreateGeneration,
    idempotency_key: str | None,
    *,
    links: Storage,
) -> Submission:
    """``links``: the storage that signs the answer's URLs (``api.deps.LinksDep``)."""
    line = served_line(state, body.model)  # before anything is stored, claimed or queued
    check_prompt(state, body)
    check_loras(state, body)
    webhook = None
    if body.webhook_url is not None:  # the SSRF check resolves the host: off the event loop
        webhook = await run_in_threadpool(
            vetted_webhook, state.settings, body.webhook_url, body.webhook_events
        )
    job_id = new_job_id()
    claim = None
    if idempotency_key is not None:
        claim = idempotency_claim(
            state, IDEMPOTENCY_PREFIX, principal, idempotency_key, body, {"job_id": job_id}
        )
    request = body.generation_request()
    if request.outpaint is not None:  # the grown canvas and its mask: an inpainting job from here on
        request = await anyio.to_thread.run_sync(request.with_outpaint_canvas, limiter=state.image_limiter)
    request = request.normalized(model=line.model)
    created_at = utcnow()
    init_key = mask_key = None
    decode = partial(anyio.to_thread.run_sync, limiter=state.image_limiter)  # bounded: CPU-heavy
    if request.init_image is not None:
        # Decoded and uploaded before the job exists: a worker may pick the job up the moment it is
        # admitted. Decoding happens here, after the key's token, in a bounded pool of threads.
        init_key = await decode(partial(_store_init_image, state, job_id, request.init_image, created_at))
    if request.mask_image is not None:
        try:
            mask_key = await decode(
                partial(_store_init_image, state, job_id, request.mask_image, created_at, mask=True)
            )
        except BaseException:
            await run_in_threadpool(_forget_init_image, state, init_key)
            raise
    record = JobRecord(
        id=job_id,
        status=JobStatus.QUEUED,
        created_at=created_at,
        request=request.model_dump(mode="json", exclude={"init_image", "mask_image"}),
        webhook=webhook,
        init_image_key=init_key,
        mask_image_key=mask_key,
        owner=principal,
    )
    try:
        admission = await line.admitter.admit(record, principal, claim)
    except BaseException:
        if init_key is not None:
            await run_in_threadpool(_forget_init_image, state, init_key, mask_key)
        raise
    if admission.outcome != "queued" and init_key is not None:
        await run_in_threadpool(_forget_init_image, state, init_key, mask_key)
    if admission.outcome in ("replay", "queue_full"):  # made nothing: the token taken for it comes back
        await give_back_submission(state, principal)
    if admission.outcome == "replay":
        existing = replayed(admission, claim)
        metrics.SUBMISSIONS.labels("idempotent_replay").inc()
        return Submission(job_id=str(existing["job_id"]), created=False)
    if admission.outcome != "queued":
        metrics.SUBMISSIONS.labels(admission.outcome).inc()
        detail = f"the queue holds {admission.value} jobs, its limit; retry later"
        share = key_share(state.settings.max_queue_depth, state.settings.queue_share_per_key)
        raise refusal(state.settings, admission, detail, share)
    metrics.SUBMISSIONS.labels("accepted").inc()
    # The request's access line carries the job id; a second INFO line per submission would double the
    # logging cost of the API's hottest path.
    structlog.contextvars.bind_contextvars(job_id=job_id)
    log.debug("job submitted", seed=request.seed, size=f"{request.width}x{request.height}")
    job = render_job(
        record,
        links,
        state.settings.url_expiry,
        # The view never echoes an init image or mask (a mask needs an init image).
        request=request if request.init_image is None else None,
        queue_position=admission.value,  # the queue's length right after our push: we are last in line
        deliveries=[] if webhook else None,
    )
    hint = queue_order.queued_retry_after(admission.value, admission.gap_ms)
    return Submission(job_id=job_id, created=True, job=job, retry_after=hint)


async def _read(
    state: AppState, job_id: str, riders: Sequence[Rider] = ()
) -> tuple[JobRecord | None, list[dict[str, Any]]]:
    """The job's record and webhook deliveries in one round trip, ``riders`` included (:func:`_pipelined`)
    — or, once the job has left Redis, from its archive (``services.jobs.archive``: None past the
    retention)."""
    valid = is_job_id(job_id)  # checked before any key is built from it: the same 404 as a made-up id

    def read(pipe: Pipeline) -> None:
        if valid:
            pipe.hgetall(job_key(job_id))
            pipe.hgetall(webhooks_key(job_id))

    replies = await _pipelined(state, riders, read)
    if not valid:
        return None, []
    raw_job, raw_deliveries = replies
    record = JobRecord.from_stored(job_id, raw_job)
    if record is not None:
        return record, decode_deliveries(raw_deliveries)
    archived = await archived_job(state, job_id)
    return (archived.record, archived.deliveries) if archived else (None, [])


async def _pipelined(
    state: AppState, riders: Sequence[Rider], queue: Callable[[Pipeline], None]
) -> list[Any]:
    """The replies to what ``queue`` puts on a pipeline, sent in one round trip with ``riders``
    (``api.riders``), which are settled first: one that refuses the request raises before the replies
    are looked at (before a 404, or an archive read). Nothing to send: no round trip."""
    async with state.redis_async.pipeline(transaction=False) as pipe:
        for rider in riders:
            rider.send(pipe)
        queue(pipe)
        replies = await pipe.execute(raise_on_error=False)
    for rider, reply in zip(riders, replies, strict=False):
        await rider.settle(reply)
    own = replies[len(riders) :]
    for reply in own:
        if isinstance(reply, Exception):
            raise reply
    return own


async def archived_job(state: AppState, job_id: str) -> ArchivedJob | None:
    """The job as archived once it left Redis (a storage read, in the threadpool); None if it was never
    archived or ended more than ``DARKROOM_JOB_RETENTION`` ago."""
    if not is_job_id(job_id):
        return None
    return await run_in_threadpool(state.clients.archive.job, job_id)


def _owned(record: JobRecord | None, principal: str, job_id: str) -> JobRecord:
    """The job if it exists *and belongs to the caller*; both misses are the same 404 (no enumeration)."""
    if record is None or record.owner != principal:
        raise NotFound(f"no generation job {job_id!r}")
    return record


async def load(state: AppState, principal: str, job_id: str) -> JobRecord:
    record, _ = await load_with_archive(state, principal, job_id)
    return record


async def load_with_archive(
    state: AppState, principal: str, job_id: str, *, riders: Sequence[Rider] = ()
) -> tuple[JobRecord, ArchivedJob | None]:
    """The caller's job, from Redis or else its archive — which is returned too (None: read from Redis),
    for a reader that also needs what the archive kept (the events an SSE stream replays). ``riders``:
    commands sent in the read's round trip (``api.riders``)."""
    valid = is_job_id(job_id)  # checked before any key is built from it: the same 404 as a made-up id

    def read(pipe: Pipeline) -> None:
        if valid:
            pipe.hgetall(job_key(job_id))

    replies = await _pipelined(state, riders, read)
    if not valid:
        return _owned(None, principal, job_id), None
    record = JobRecord.from_stored(job_id, replies[0])
    if record is not None:
        return _owned(record, principal, job_id), None
    archived = await archived_job(state, job_id)
    return _owned(archived.record if archived else None, principal, job_id), archived


async def view(
    state: AppState, principal: str, job_id: str, *, links: Storage, riders: Sequence[Rider] = ()
) -> Job:
    """The public job, with URLs signed now and the current queue position. ``riders``: commands sent in
    the read's round trip (``api.riders``)."""
    job, _ = await polled_view(state, principal, job_id, links=links, riders=riders)
    return job


async def polled_view(
    state: AppState, principal: str, job_id: str, *, links: Storage, riders: Sequence[Rider] = ()
) -> tuple[Job, int | None]:
    """:func:`view`, and the ``Retry-After`` hint for a poller (None once the job has ended). A queued
    job's position costs one ``HMGET`` of its queue's counters (``services.queue_order``), whatever its
    place; only a record admitted before those counters falls back to ``LPOS``."""
    job, _, hint = await _viewed(state, principal, job_id, links, riders)
    return job, hint


async def view_with_record(
    state: AppState, principal: str, job_id: str, *, links: Storage, riders: Sequence[Rider] = ()
) -> tuple[Job, JobRecord]:
    """:func:`view`, and the record it shows, read once for both (the OpenAI route's images' keys)."""
    job, record, _ = await _viewed(state, principal, job_id, links, riders)
    return job, record


async def _viewed(
    state: AppState, principal: str, job_id: str, links: Storage, riders: Sequence[Rider]
) -> tuple[Job, JobRecord, int | None]:
    record, deliveries = await _read(state, job_id, riders)
    record = _owned(record, principal, job_id)
    position = None
    gap_ms = None
    if record.status is JobStatus.QUEUED:
        if record.queue_seq is not None and record.queue_order:
            order = await queue_order.read_order_async(state.redis_async, record.queue_order)
            position, gap_ms = order.position(record.queue_seq), order.gap_ms
        else:
            queue = job_queue(state.clients.redis, state.settings, record)
            position = await queue_position_async(state.redis_async, queue, job_id)
    job = render_job(
        record,
        links,
        state.settings.url_expiry,
        queue_position=position,
        deliveries=deliveries if record.webhook else None,
    )
    return job, record, queue_order.retry_after(job, gap_ms)


def _cancel(state: AppState, record: JobRecord) -> None:
    if record.status.is_terminal:  # read from the archive, perhaps: nothing in Redis to change
        raise Conflict(f"job {record.id} is already {record.status.value}", code="job_already_finished")
    queue = job_queue(state.clients.redis, state.settings, record)
    previous = state.clients.lifecycle.cancel(record.id, "canceled while queued", rq=remove_from_queue(queue))
    if previous is None:
        raise NotFound(f"no generation job {record.id!r}")
    if previous.is_terminal:
        raise Conflict(f"job {record.id} is already {previous.value}", code="job_already_finished")


async def cancel(state: AppState, principal: str, job_id: str, *, links: Storage) -> Job:
    """Queued: canceled at once. Running: interrupted at the next denoising step. Finished: 409."""
    record = await load(state, principal, job_id)
    await run_in_threadpool(_cancel, state, record)
    return await view(state, principal, job_id, links=links)
