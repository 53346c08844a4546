"""The job as clients see it: status, progress, the normalised request, images with fresh URLs, errors.

Stored form and public form differ on purpose: the store keeps object *keys*, this view carries URLs signed
at the moment of reading (they expire), and a queued job's position is computed from the queue on read.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import AnyHttpUrl, ConfigDict, Field

from schemas.base import ResponseModel
from schemas.generation import GenerationRequest
from schemas.webhooks import (
    JOB_EVENTS_DESCRIPTION,
    JobSubscription,
    Subscribed,
    WebhookEvent,
    default_job_events,
)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


class CreateGeneration(GenerationRequest):
    """The body of ``POST /v1/generations``: a generation request plus where to report it."""

    webhook_url: AnyHttpUrl | None = Field(
        None, description="Where to POST signed (Standard Webhooks) events about this job."
    )
    webhook_events: JobSubscription = Field(
        default_factory=default_job_events,
        min_length=1,
        description=JOB_EVENTS_DESCRIPTION,
    )

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest.model_validate(
            self.model_dump(exclude={"webhook_url", "webhook_events"}, exclude_unset=True)
        )


class Progress(ResponseModel):
    step: int = Field(ge=0)
    total: int = Field(ge=0)


FinishReason = Literal["stop", "content_filtered"]


class ImageResult(ResponseModel):
    """One image of a job. ``finish_reason`` ``content_filtered``: the image classifier withheld it, so it
    has no ``url`` and no ``sha256`` (it was never stored); the other images of the job are unaffected."""

    url: str | None = Field(
        description="Signed, expiring URL; a fresh one is issued on every read. null when content_filtered."
    )
    seed: int
    width: int
    height: int
    content_type: str
    sha256: str | None = Field(description="SHA-256 of the stored file; null when content_filtered.")
    finish_reason: FinishReason = Field(
        "stop",
        description="'stop': generated and stored; 'content_filtered': withheld by the content filter.",
    )
    filter_reason: str | None = Field(
        None, description="With content_filtered: the category the classifier gave, if any."
    )


class JobErrorCode(StrEnum):
    """Why a job ended without its images (``error.type``): a stable machine code.

    canceled: asked to stop. worker_lost: its worker died on every allowed attempt. out_of_memory: try
    fewer images or a smaller size. invalid_request: refused by the engine. model_unavailable: no worker
    serves the model any more (the message says why), or the worker could not use it. lora_unavailable: a
    requested LoRA could not be used. content_check_failed: the image classifier failed, so nothing was
    released unchecked. encoding_failed: an image could not be encoded in the requested format.
    storage_unavailable / storage_error: the
    images could not be stored. generation_failed: the pipeline failed. timed_out: ran longer than the
    job timeout. internal_error: a bug on the server's side.
    """

    # Defined here, once, so clients generated from the OpenAPI spec get them as an enum; each is raised in
    # one place (worker/errors.py, the storage errors, cancel, lost-job recovery, worker/runner.py, the
    # stranded-job sweep: services/jobs/unserved.py).

    CANCELED = "canceled"  # asked to stop: while queued (at once) or running (at the next step)
    WORKER_LOST = "worker_lost"  # its worker died (no heartbeat) on every one of max_attempts runs
    OUT_OF_MEMORY = "out_of_memory"  # the device ran out of memory; fewer images or a smaller size may fit
    INVALID_REQUEST = "invalid_request"  # refused by the engine (the API should have refused it first)
    MODEL_UNAVAILABLE = "model_unavailable"  # the worker could not use its model, or none serves it
    LORA_UNAVAILABLE = "lora_unavailable"  # a requested LoRA is not on this worker or would not load
    CONTENT_CHECK_FAILED = "content_check_failed"  # the image classifier failed: nothing passes unchecked
    ENCODING_FAILED = "encoding_failed"  # an image could not be encoded (with its metadata) as asked
    STORAGE_UNAVAILABLE = "storage_unavailable"  # storage unreachable past the retry deadline
    STORAGE_ERROR = "storage_error"  # storage refused the request (permissions, bucket, ...)
    GENERATION_FAILED = "generation_failed"  # the pipeline failed in a way it reported on purpose
    TIMED_OUT = "timed_out"  # ran longer than DARKROOM_JOB_TIMEOUT
    INTERNAL_ERROR = "internal_error"  # a bug of ours; the worker's log has the traceback


class JobError(ResponseModel):
    type: JobErrorCode = Field(description="Stable machine code: why the job ended without its images.")
    message: str


class WebhookAttempt(ResponseModel):
    at: datetime
    attempt: int
    status_code: int | None = None
    error: str | None = None
    duration_ms: float


class WebhookDelivery(ResponseModel):
    event: WebhookEvent = Field(description="The event delivered (the payload's type).")
    msg_id: str
    state: Literal["pending", "delivered", "failed", "gone"]
    attempts: list[WebhookAttempt] = Field(default_factory=list)


def _deliveries_not_in_webhooks(schema: dict[str, Any]) -> None:
    schema["required"] = [name for name in schema.get("required", []) if name != "deliveries"]


class WebhookStatus(ResponseModel):
    # deliveries is always on GET, never in a webhook payload's copy of the job (see its description).
    model_config = ConfigDict(json_schema_extra=_deliveries_not_in_webhooks)

    url: str
    events: Subscribed = Field(description="The events subscribed to, by canonical name.")
    deliveries: list[WebhookDelivery] = Field(
        default_factory=list,
        description="Each event's delivery and its attempts. Left out of the job a webhook payload "
        "carries: it changes with every attempt, so it would be stale on arrival.",
    )


class Job(ResponseModel):
    model_config = ConfigDict(use_enum_values=False)

    id: str
    status: JobStatus
    queue_position: int | None = Field(
        None,
        description="While queued: the place in line, 1 = next to run (null otherwise). Counted in O(1) "
        "from the queue's enqueue order: exact while jobs leave in order; an estimate otherwise — a job "
        "canceled while ahead still counts until a job behind it starts (too high), a lost job put back at "
        "the front (position 1) and a job started early with an identical one ahead of it are not "
        "counted (too low). Never below 1.",
    )
    progress: Progress | None = None
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    request: GenerationRequest = Field(
        description="The normalised request, with the seed and size actually used. init_image and "
        "mask_image are omitted; see init_image_url and mask_image_url."
    )
    init_image_url: str | None = None
    mask_image_url: str | None = Field(None, description="Inpainting: the mask as uploaded (signed URL).")
    images: list[ImageResult] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    token_counts: dict[str, dict[str, int | None]] | None = None
    error: JobError | None = None
    webhook: WebhookStatus | None = None
    batch_id: str | None = Field(None, description="The batch this job is an item of (POST /v1/batches).")
