"""Batches as the API manages them: submit (all items or none, idempotent), read with per-item states,
cancel. The items are ordinary generation jobs (``api.generations``) on the batch queue; this module only
adds the batch around them.

Decisions, also in the README:
- one submission token per batch (taken before validation, ``api.limits``), and batch tokens in
  proportion to what it stores: one per item plus one per ``DARKROOM_BATCH_TOKEN_BYTES`` of item requests
  (``services.admission.batch_cost``), from a bucket of their own; a batch storing more than
  ``DARKROOM_MAX_BATCH_STORED_BYTES`` of requests, or costing more than the bucket holds, is 413
  ``batch_too_large``;
- the batch queue's own ceiling (``DARKROOM_MAX_BATCH_QUEUE_DEPTH``) must hold all of its items, or the
  whole batch gets 503; the key's share of it (``DARKROOM_QUEUE_SHARE_PER_KEY``) too, or 429
  ``queue_share_exceeded``;
- ``Idempotency-Key``\\s are scoped per API key *and* to this endpoint (a key used for a single job and
  for a batch names two different things);
- reads page through the items (``offset``/``limit``, 100 by default, at most 1,000); counts and status
  always cover all of them;
- cancel ends queued items at once and asks running ones to stop at their next step; the batch is
  ``canceled`` once every item has ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import anyio
import structlog
from fastapi.concurrency import run_in_threadpool

from api.errors import ApiError, Conflict, NotFound, UnprocessableRequest
from api.generations.service import check_loras, check_prompt
from api.limits import give_back_submission
from api.state import AppState, ModelLine
from api.submissions import idempotency_claim, refusal, replayed, served_line, vetted_webhook
from schemas.batches import DEFAULT_PAGE, Batch, BatchItem, BatchList, CreateBatch
from schemas.jobs import JobStatus
from schemas.problems import FieldError
from services import metrics
from services.admission import batch_cost, key_share
from services.batch_views import render_batch, render_batch_summary, render_item
from services.jobs import JobRecord, decode_deliveries, job_key, new_job_id, utcnow
from services.jobs.archive import ArchivedBatch
from services.jobs.batches import BatchRecord, new_batch_id
from services.jobs.keys import batch_key, batch_webhooks_key, is_batch_id, items_key, owner_batches_key
from services.queue import batch_queue
from services.storage import Storage

log = structlog.get_logger(__name__)
IDEMPOTENCY_PREFIX = "darkroom:idempotency:batch:"
#: Archived items of one page read from storage at a time.
_ARCHIVE_READS = 16


@dataclass(frozen=True)
class BatchSubmission:
    batch_id: str
    created: bool  # False when an Idempotency-Key replay returned an existing batch
    batch: Batch | None = None  # the new batch as admitted (None for a replay: read it)


def _batch_line(state: AppState, body: CreateBatch) -> ModelLine:
    """The one model every item is drawn by: items may name it or not, but not two different ones
    (one queue per model, and one batch is one admission onto one of them)."""
    if body.template is not None:
        return served_line(state, body.template.model, "template.model")
    named = [(index, item.model) for index, item in enumerate(body.requests or []) if item.model]
    line = served_line(
        state, named[0][1] if named else None, f"requests.{named[0][0]}.model" if named else "model"
    )
    for index, model in named:
        if model != line.model:
            message = (
                f"a batch is drawn by one model: item {named[0][0]} names {line.model!r}, "
                f"item {index} {model!r} (submit a batch per model)"
            )
            raise UnprocessableRequest(
                message,
                code="mixed_models",
                errors=[FieldError(field=f"requests.{index}.model", message=message, type="mixed_models")],
            )
    return line


def _records(
    state: AppState,
    principal: str,
    body: CreateBatch,
    webhook: dict[str, Any] | None,
    model: str,
) -> tuple[BatchRecord, list[JobRecord]]:
    created_at = utcnow()
    batch = BatchRecord(
        id=new_batch_id(),
        owner=principal,
        created_at=created_at,
        total=0,
        retention_s=max(1, int(state.settings.job_retention.total_seconds())),
        webhook=webhook,
        model=model,
    )
    item_events = body.item_webhook_events()
    item_webhook = {"url": webhook["url"], "events": item_events} if webhook and item_events else None
    items = [
        JobRecord(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            created_at=created_at,
            request=request.normalized(model=model).model_dump(mode="json", exclude={"init_image"}),
            webhook=item_webhook,
            owner=principal,
            batch_id=batch.id,
        )
        for request in body.item_requests()
    ]
    batch.total = len(items)
    return batch, items


def _check_prompts(state: AppState, body: CreateBatch) -> None:
    """The prompt filter (``DARKROOM_PROMPT_BLOCKLIST``) and the LoRA allow-list over every item, as for a
    single job: 422 naming the item's field (``requests.3.prompt``, ``template.loras.0.name``)."""
    if body.requests is not None:
        listed = [(f"requests.{index}", item) for index, item in enumerate(body.requests)]
    else:
        listed = [("template", body.template)] if body.template is not None else []
    for where, item in listed:
        try:
            check_prompt(state, item)
            check_loras(state, item)
        except UnprocessableRequest as exc:
            exc.errors = [
                error.model_copy(update={"field": f"{where}.{error.field}"}) for error in exc.errors or []
            ]
            raise


#: Bytes an item stores besides its prompts (the rest of its request JSON), as counted for its cost.
ITEM_REQUEST_OVERHEAD = 512


def _item_count(body: CreateBatch) -> int:
    if body.requests is not None:
        return len(body.requests)
    return len(body.seeds) if body.seeds is not None else body.count or 0


def stored_request_bytes(body: CreateBatch) -> int:
    """About what the batch's item requests take in Redis: their prompts as UTF-8, plus the rest of each
    request. Computed from the body, before a thousand records are built from it."""

    def size(item: Any) -> int:
        return len(item.prompt.encode()) + len((item.negative_prompt or "").encode()) + ITEM_REQUEST_OVERHEAD

    if body.template is not None:
        return size(body.template) * _item_count(body)
    return sum(size(item) for item in body.requests or [])


def _check_cost(state: AppState, body: CreateBatch) -> int:
    """The batch's cost in batch tokens; 413 ``batch_too_large`` for a batch that stores more than
    ``DARKROOM_MAX_BATCH_STORED_BYTES`` or costs more than the key's batch bucket can ever hold."""
    settings = state.settings
    stored = stored_request_bytes(body)
    items = _item_count(body)
    cost = batch_cost(items, stored, settings.batch_token_bytes)
    if stored > settings.max_batch_stored_bytes:
        limit = settings.max_batch_stored_bytes
        why = f"its {items} item requests would store {stored} bytes, more than {limit}"
    elif settings.batch_items_per_minute and cost > settings.batch_items_burst:
        burst = settings.batch_items_burst
        why = f"it costs {cost} batch tokens, more than the {burst} a key may spend at once"
    else:
        return cost
    raise ApiError(
        f"batch too large: {why}; send fewer items or shorter prompts",
        status=413,
        code="batch_too_large",
    )


async def submit(
    state: AppState, principal: str, body: CreateBatch, idempotency_key: str | None
) -> BatchSubmission:
    line = _batch_line(state, body)  # before anything is stored, claimed or queued
    _check_prompts(state, body)
    cost = _check_cost(state, body)
    webhook = None
    if body.webhook_url is not None:  # the SSRF check resolves the host: off the event loop
        webhook = await run_in_threadpool(
            vetted_webhook, state.settings, body.webhook_url, body.webhook_events
        )
    # ~50 µs of Python per item: a large batch builds its records off the event loop.
    batch, items = await run_in_threadpool(_records, state, principal, body, webhook, line.model)
    claim = None
    if idempotency_key is not None:
        created = {"batch_id": batch.id}
        claim = idempotency_claim(state, IDEMPOTENCY_PREFIX, principal, idempotency_key, body, created)
    admission = await line.batch_admitter.admit(batch, items, principal, claim, cost)
    if admission.outcome in ("replay", "queue_full"):  # made nothing: the submission token comes back
        await give_back_submission(state, principal)
    if admission.outcome == "replay":
        existing = replayed(admission, claim)
        return BatchSubmission(batch_id=str(existing["batch_id"]), created=False)
    if admission.outcome != "queued":
        detail = (
            f"the batch queue holds {admission.value} items and cannot take {len(items)} more; retry later"
        )
        share = key_share(state.settings.max_batch_queue_depth, state.settings.queue_share_per_key)
        raise refusal(state.settings, admission, detail, share)
    metrics.SUBMISSIONS.labels("accepted").inc(len(items))
    structlog.contextvars.bind_contextvars(batch_id=batch.id)
    log.debug("batch submitted", items=len(items))
    page = [BatchItem(id=item.id, status=JobStatus.QUEUED) for item in items[:DEFAULT_PAGE]]
    view = render_batch(
        batch,
        [JobStatus.QUEUED.value] * len(items),
        items=page,
        next_offset=len(page) if len(page) < len(items) else None,
        deliveries=[] if webhook else None,
    )
    return BatchSubmission(batch_id=batch.id, created=True, batch=view)


def _owned(record: BatchRecord | None, principal: str, batch_id: str) -> BatchRecord:
    """The batch if it exists *and belongs to the caller*; both misses are the same 404."""
    if record is None or record.owner != principal:
        raise NotFound(f"no batch {batch_id!r}")
    return record


async def view(
    state: AppState,
    principal: str,
    batch_id: str,
    offset: int = 0,
    limit: int = DEFAULT_PAGE,
    *,
    links: Storage,
) -> Batch:
    """The batch, counts over all items, and items ``offset``..``offset + limit`` with fresh URLs."""
    if not is_batch_id(batch_id):  # before any key is built from it: the same 404 as a made-up id
        raise NotFound(f"no batch {batch_id!r}")
    redis = state.redis_async
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(batch_key(batch_id))
        pipe.lrange(items_key(batch_id), 0, -1)
        pipe.hgetall(batch_webhooks_key(batch_id))
        raw_batch, raw_ids, raw_deliveries = await pipe.execute()
    if raw_batch and b"archived_at" not in raw_batch:
        record = _owned(BatchRecord.from_hash(batch_id, raw_batch), principal, batch_id)
        ids = [raw.decode() for raw in raw_ids]
        deliveries = decode_deliveries(raw_deliveries)
        statuses: list[str | None] | None = None
    else:  # archived (its items may be leaving Redis) or gone from Redis: the archive has it all
        archived = await run_in_threadpool(state.clients.archive.batch, batch_id)
        if archived is None:
            raise NotFound(f"no batch {batch_id!r}")
        record = _owned(archived.record, principal, batch_id)
        ids, statuses, deliveries = archived.item_ids, archived.statuses, archived.deliveries
    page_ids = ids[offset : offset + limit]
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids if statuses is None else []:
            pipe.hget(job_key(job_id), "status")
        for job_id in page_ids:
            pipe.hgetall(job_key(job_id))
        replies = await pipe.execute()
    if statuses is None:
        statuses = [value.decode() if value else None for value in replies[: len(ids)]]
        replies = replies[len(ids) :]
    expiry = state.settings.url_expiry
    records = await _page_records(state, page_ids, replies)
    page = [render_item(record, links, expiry) for record in records if record is not None]
    end = offset + len(page_ids)
    return render_batch(
        record,
        statuses,
        items=page,
        next_offset=end if end < len(ids) else None,
        deliveries=deliveries if record.webhook else None,
    )


async def _page_records(
    state: AppState, job_ids: list[str], raw: list[dict[bytes, bytes]]
) -> list[JobRecord | None]:
    """A page's item records from their Redis hashes, each missing one from its archive (read in the
    threadpool, several at a time): items leave Redis after their batch is archived."""
    records = [JobRecord.from_stored(job_id, hash_) for job_id, hash_ in zip(job_ids, raw, strict=True)]
    missing = [n for n, found in enumerate(records) if found is None]
    if not missing:
        return records
    limiter = anyio.CapacityLimiter(_ARCHIVE_READS)

    async def fetch(n: int) -> None:
        archived = await anyio.to_thread.run_sync(state.clients.archive.job, job_ids[n], limiter=limiter)
        records[n] = archived.record if archived else None

    async with anyio.create_task_group() as group:
        for n in missing:
            group.start_soon(fetch, n)
    return records


async def list_batches(state: AppState, principal: str, offset: int, limit: int) -> BatchList:
    """The caller's batches, newest first: ``offset``..``offset + limit`` of its index, each with status
    and counts over all of its items (no items: ``GET /v1/batches/{id}`` pages them). Two round trips
    whatever the batches hold: the counts are the batch hash's own (``render_batch_summary``), no item is
    read. A batch that has left Redis is read from its archive (several at a time, in the threadpool).
    Index entries whose batch has expired (or passed its retention) are dropped as they are met."""
    index = owner_batches_key(principal)
    redis = state.redis_async
    raw_keys = cast(list[bytes], await redis.zrevrange(index, offset, offset + limit))  # +1: more?
    keys = [raw.decode() for raw in raw_keys[:limit]]
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
            pipe.hgetall(batch_webhooks_key(key.removeprefix(batch_key(""))))
        replies = await pipe.execute()
    page: list[Batch] = []
    gone: list[str] = []
    ids = [key.removeprefix(batch_key("")) for key in keys]
    archived = await _archived_batches(
        state, [batch_id for n, batch_id in enumerate(ids) if not replies[2 * n] and is_batch_id(batch_id)]
    )
    for n, key in enumerate(keys):
        raw_batch, raw_deliveries = replies[2 * n], replies[2 * n + 1]
        batch_id = ids[n]
        record = BatchRecord.from_hash(batch_id, raw_batch) if raw_batch else None
        deliveries = decode_deliveries(raw_deliveries)
        if record is None and (found := archived.get(batch_id)) is not None:  # left Redis: its archive
            record, deliveries = found.record, found.deliveries
        if record is None or record.owner != principal:
            gone.append(key)
            continue
        page.append(render_batch_summary(record, deliveries if record.webhook else None))
    if gone:
        await redis.zrem(index, *gone)
    more = len(raw_keys) > limit
    return BatchList(data=page, next_offset=offset + limit if more else None)


async def _archived_batches(state: AppState, batch_ids: list[str]) -> dict[str, ArchivedBatch]:
    """The archives of these batches that exist and are within the retention, read concurrently."""
    found: dict[str, ArchivedBatch] = {}
    limiter = anyio.CapacityLimiter(_ARCHIVE_READS)

    async def fetch(batch_id: str) -> None:
        archived = await anyio.to_thread.run_sync(state.clients.archive.batch, batch_id, limiter=limiter)
        if archived is not None:
            found[batch_id] = archived

    async with anyio.create_task_group() as group:
        for batch_id in batch_ids:
            group.start_soon(fetch, batch_id)
    return found


def _cancel(state: AppState, batch_id: str, model: str | None) -> None:
    """Queued items: canceled now (and off the batch queue). Running ones: asked to stop at their next
    step (``Lifecycle.cancel_batch``)."""
    queue = batch_queue(state.clients.redis, state.settings, model)
    if state.clients.lifecycle.cancel_batch(batch_id, queue) is None:
        raise Conflict(f"batch {batch_id} has already ended", code="batch_already_finished")


async def cancel(state: AppState, principal: str, batch_id: str, *, links: Storage) -> Batch:
    """Cancel what has not ended; 409 ``batch_already_finished`` if everything has."""
    current = await view(state, principal, batch_id, limit=0, links=links)
    if current.status.is_terminal:
        raise Conflict(f"batch {batch_id} is already {current.status.value}", code="batch_already_finished")
    await run_in_threadpool(_cancel, state, batch_id, current.model)
    return await view(state, principal, batch_id, links=links)
