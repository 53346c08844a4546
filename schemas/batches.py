"""Batches: up to 1,000 generation requests submitted, followed and canceled as one.

A batch is written either as a list of requests or as one request (``template``) repeated over ``seeds``
(one item per seed) or ``count`` times. Each item becomes an ordinary generation job — readable at
``/v1/generations/{id}``, with ``batch_id`` set — that waits on a lower-priority queue, so interactive
jobs are served first. Errors name the offending item's field (``requests.17.width``), as the API's
validation errors always do (dotted paths).

Items are text-to-image: ``init_image`` is refused (a batch body of a thousand inline images would not fit
the 15 MB body limit anyway).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from schemas.base import ResponseModel
from schemas.generation import MAX_SEED, GenerationRequest, json_number
from schemas.jobs import ImageResult, JobError, JobStatus, WebhookDelivery
from schemas.webhooks import (
    BATCH_EVENTS_DESCRIPTION,
    BatchSubscription,
    Subscribed,
    WebhookEvent,
    default_batch_events,
)

MAX_BATCH_ITEMS = 1000
MAX_PAGE = 1000
DEFAULT_PAGE = 100


# Constraints before the validator: pydantic then writes them as standard minimum/maximum (the other
# order leaves non-standard ge/le keywords in the JSON schema).
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(json_number)]


class BatchItemRequest(GenerationRequest):
    """One item of a batch: a generation request (text-to-image only: no ``init_image``)."""

    @field_validator("init_image")
    @classmethod
    def _text_to_image_only(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("batch items are text-to-image only: init_image is not accepted")
        return value


class CreateBatch(BaseModel):
    """The body of ``POST /v1/batches``: ``requests``, or ``template`` with ``seeds`` or ``count``."""

    model_config = ConfigDict(extra="forbid")

    requests: list[BatchItemRequest] | None = Field(
        None,
        min_length=1,
        max_length=MAX_BATCH_ITEMS,
        description=f"1..{MAX_BATCH_ITEMS} generation requests, one item each (not with template).",
    )
    template: BatchItemRequest | None = Field(
        None,
        validate_default=True,
        description="One generation request repeated for every seed in seeds, or count times.",
    )
    seeds: list[Seed] | None = Field(
        None,
        min_length=1,
        max_length=MAX_BATCH_ITEMS,
        validate_default=True,
        description="With template: one item per seed (each 0..4294967295).",
    )
    count: int | None = Field(
        None,
        ge=1,
        le=MAX_BATCH_ITEMS,
        validate_default=True,
        description="With template: this many items. Seeds are drawn per item, or, if the template has a "
        "seed s, item i uses s + i * num_images (every image its own seed).",
    )
    webhook_url: AnyHttpUrl | None = Field(
        None, description="Where to POST signed (Standard Webhooks) events about this batch."
    )
    webhook_events: BatchSubscription = Field(
        default_factory=default_batch_events,
        min_length=1,
        description=BATCH_EVENTS_DESCRIPTION,
    )

    @field_validator("count", mode="before")
    @classmethod
    def _count_is_a_number(cls, value: Any) -> Any:
        return json_number(value)

    @field_validator("template")
    @classmethod
    def _one_way_to_list_items(
        cls, template: BatchItemRequest | None, info: ValidationInfo
    ) -> BatchItemRequest | None:
        if "requests" not in info.data:  # requests itself failed; its own error says why
            return template
        requests = info.data["requests"]
        if template is not None and requests is not None:
            raise ValueError("give either requests or template (with seeds or count), not both")
        if template is None and requests is None:
            raise ValueError("give requests, or a template with seeds or count")
        return template

    @field_validator("seeds")
    @classmethod
    def _seeds_for_a_template(cls, seeds: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if seeds is None:
            return seeds
        template = info.data.get("template")
        if "template" in info.data and template is None:
            raise ValueError("seeds need a template (the request each seed is applied to)")
        if template is not None and template.seed is not None:
            raise ValueError("give the seeds in seeds or one seed in template, not both")
        return seeds

    @field_validator("count")
    @classmethod
    def _count_for_a_template(cls, count: int | None, info: ValidationInfo) -> int | None:
        if "template" not in info.data or "seeds" not in info.data:
            return count  # their own errors say what is wrong
        template, seeds = info.data["template"], info.data["seeds"]
        if count is not None and seeds is not None:
            raise ValueError("give seeds or count, not both")
        if count is not None and template is None:
            raise ValueError("count needs a template (the request to repeat)")
        if template is not None and count is None and seeds is None:
            raise ValueError("a template needs seeds (one item each) or count")
        return count

    def item_requests(self) -> list[GenerationRequest]:
        """The batch's items as plain generation requests, in order (not normalised yet)."""
        if self.requests is not None:
            return [_plain(item) for item in self.requests]
        assert self.template is not None  # the validators guarantee one of the two
        base = _plain(self.template)
        if self.seeds is not None:
            return [base.model_copy(update={"seed": seed}) for seed in self.seeds]
        count = self.count or 0
        if base.seed is None:
            return [base.model_copy() for _ in range(count)]
        step = base.num_images
        return [
            base.model_copy(update={"seed": (base.seed + i * step) % (MAX_SEED + 1)}) for i in range(count)
        ]

    def item_webhook_events(self) -> list[str]:
        """The item jobs' own subscriptions: the batch's ``generation.*`` events apply to every item."""
        return [event for event in self.webhook_events if event != WebhookEvent.BATCH_COMPLETED]


def _plain(item: BatchItemRequest) -> GenerationRequest:
    return GenerationRequest.model_validate(item.model_dump(exclude_unset=True))


class BatchStatus(StrEnum):
    QUEUED = "queued"  # no item has started yet
    RUNNING = "running"  # some item started or ended, not all have ended
    COMPLETED = "completed"  # every item ended (succeeded, failed or canceled)
    CANCELED = "canceled"  # every item ended, after a cancel request

    @property
    def is_terminal(self) -> bool:
        return self in (BatchStatus.COMPLETED, BatchStatus.CANCELED)


class BatchCounts(ResponseModel):
    total: int
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0


class BatchItem(ResponseModel):
    """One item, in brief; ``GET /v1/generations/{id}`` has the whole job."""

    id: str
    status: JobStatus
    images: list[ImageResult] = Field(default_factory=list)
    error: JobError | None = None


class BatchWebhookStatus(ResponseModel):
    url: str
    events: Subscribed = Field(description="The events subscribed to, by canonical name.")
    deliveries: list[WebhookDelivery] = Field(
        default_factory=list, description="The batch.completed delivery (per-item ones are on each job)."
    )


class BatchSummary(ResponseModel):
    """A batch's status and counts: what ``batch.completed`` carries (read the items with
    ``GET /v1/batches/{id}``)."""

    id: str
    model: str | None = Field(None, description="The model every item is drawn by.")
    status: BatchStatus
    created_at: datetime
    completed_at: datetime | None = None
    cancel_requested: bool = False
    counts: BatchCounts


class Batch(BatchSummary):
    items: list[BatchItem] | None = Field(
        None,
        description="This page of items in submission order (see offset and limit); absent in webhooks "
        "and lists.",
    )
    next_offset: int | None = Field(
        None, description="The offset of the next page of items; null at the end."
    )
    webhook: BatchWebhookStatus | None = None


class BatchList(ResponseModel):
    """``GET /v1/batches``: the caller's batches, newest first, one page at a time."""

    object: Literal["list"] = "list"
    data: list[Batch] = Field(description="This page of batches (status and counts; no items: GET one).")
    next_offset: int | None = Field(None, description="The offset of the next page; null at the end.")
