"""A stored batch in its public form: status and counts from its items' states, a page of items with
image URLs signed now. Shared by the API (``GET /v1/batches/{id}``) and the webhook task (the
``batch.completed`` payload, which leaves the items out)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from schemas.batches import Batch, BatchCounts, BatchItem, BatchStatus, BatchWebhookStatus
from schemas.jobs import JobStatus, WebhookDelivery
from services.job_views import render_job
from services.jobs import JobRecord
from services.jobs.batches import BatchRecord, BatchStore
from services.storage import Storage


def batch_status(record: BatchRecord, statuses: list[str | None]) -> BatchStatus:
    """Ended (``completed_at`` is stamped by the transition that ends the last item): canceled if a cancel
    was asked for first, else completed. Otherwise queued until some item leaves ``queued``."""
    if record.completed_at is not None:
        return BatchStatus.CANCELED if record.cancel_requested else BatchStatus.COMPLETED
    if all(status in (None, JobStatus.QUEUED.value) for status in statuses):
        return BatchStatus.QUEUED
    return BatchStatus.RUNNING


def render_item(job: JobRecord, storage: Storage, url_expiry: timedelta) -> BatchItem:
    """An item in brief, its images rendered exactly as the job's own view renders them."""
    view = render_job(job, storage, url_expiry)
    return BatchItem(id=job.id, status=job.status, images=view.images, error=view.error)


def render_batch(
    record: BatchRecord,
    statuses: list[str | None],
    *,
    items: list[BatchItem] | None = None,
    next_offset: int | None = None,
    deliveries: list[dict[str, Any]] | None = None,
) -> Batch:
    """``statuses``: every item's status, in order (None for an expired item record)."""
    counted = Counter(status for status in statuses if status is not None)
    counts = BatchCounts(total=record.total, **{status.value: counted[status.value] for status in JobStatus})
    return Batch(
        id=record.id,
        model=record.model,
        status=batch_status(record, statuses),
        created_at=record.created_at,
        completed_at=record.completed_at,
        cancel_requested=record.cancel_requested,
        counts=counts,
        items=items,
        next_offset=next_offset,
        webhook=_webhook_status(record, deliveries),
    )


def _webhook_status(
    record: BatchRecord, deliveries: list[dict[str, Any]] | None
) -> BatchWebhookStatus | None:
    """The batch's webhook and its ``batch.completed`` delivery records, as both views show them."""
    if not record.webhook:
        return None
    return BatchWebhookStatus(
        url=record.webhook["url"],
        events=record.webhook["events"],
        deliveries=[WebhookDelivery.model_validate(d) for d in deliveries or []],
    )


def render_batch_summary(record: BatchRecord, deliveries: list[dict[str, Any]] | None = None) -> Batch:
    """The batch from its hash alone, with counts as the lifecycle keeps them there (queued: the items
    neither running nor ended) — what ``GET /v1/batches`` lists, without reading any item."""
    counted = record.counted
    running = max(0, counted.get("running", 0))
    ended = {status: counted.get(status, 0) for status in ("succeeded", "failed", "canceled")}
    queued = max(0, record.total - record.done - running)
    counts = BatchCounts(total=record.total, queued=queued, running=running, **ended)
    if record.completed_at is not None:
        status = BatchStatus.CANCELED if record.cancel_requested else BatchStatus.COMPLETED
    else:
        status = BatchStatus.QUEUED if queued == record.total else BatchStatus.RUNNING
    return Batch(
        id=record.id,
        model=record.model,
        status=status,
        created_at=record.created_at,
        completed_at=record.completed_at,
        cancel_requested=record.cancel_requested,
        counts=counts,
        webhook=_webhook_status(record, deliveries),
    )


def read_batch(batches: BatchStore, record: BatchRecord) -> Batch:
    """The batch without its items (what ``batch.completed`` carries), read with the sync client."""
    statuses = batches.item_statuses(batches.item_ids(record.id))
    return render_batch(record, statuses)
