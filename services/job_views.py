"""Turning a stored job into its public form: fresh signed URLs, queue position, webhook deliveries.

Shared by the API (every GET, SSE final event) and the webhook task (event payloads), so a job reads the
same wherever a client meets it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from schemas.generation import NORMALIZED_CONTEXT, GenerationRequest
from schemas.jobs import ImageResult, Job, JobError, Progress, WebhookDelivery, WebhookStatus
from services.jobs import JobRecord
from services.storage import Storage


def render_job(
    record: JobRecord,
    storage: Storage,
    url_expiry: timedelta,
    *,
    queue_position: int | None = None,
    deliveries: list[dict[str, Any]] | None = None,
    request: GenerationRequest | None = None,
) -> Job:
    """``request``: the record's request as a model, when the caller already holds it (a submission
    just admitted), so it is not validated a second time."""
    images = [
        ImageResult(
            # A filtered image was never stored: no key, so no URL.
            url=storage.url_for(image["key"], url_expiry) if "key" in image else None,
            seed=image["seed"],
            width=image["width"],
            height=image["height"],
            content_type=image["content_type"],
            sha256=image.get("sha256"),
            finish_reason=image.get("finish_reason", "stop"),  # records from before content safety
            filter_reason=image.get("filter_reason"),
        )
        for image in record.images
    ]
    webhook = None
    if record.webhook:
        webhook = WebhookStatus(
            url=record.webhook["url"],
            events=record.webhook["events"],
            deliveries=[WebhookDelivery.model_validate(d) for d in deliveries or []],
        )
    return Job(
        id=record.id,
        status=record.status,
        queue_position=queue_position,
        progress=Progress(**record.progress) if record.progress else None,
        created_at=record.created_at,
        started_at=record.started_at,
        completed_at=record.completed_at,
        request=request or GenerationRequest.model_validate(record.request, context=NORMALIZED_CONTEXT),
        init_image_url=storage.url_for(record.init_image_key, url_expiry) if record.init_image_key else None,
        mask_image_url=storage.url_for(record.mask_image_key, url_expiry) if record.mask_image_key else None,
        images=images,
        warnings=record.warnings,
        token_counts=record.token_counts,
        error=JobError(**record.error) if record.error else None,
        webhook=webhook,
        batch_id=record.batch_id,
    )
