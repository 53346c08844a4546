"""The bodies of webhook deliveries, as models: what the OpenAPI ``webhooks`` section documents.

``services.webhooks.tasks`` builds the bytes (``{"type", "timestamp", "data"}``); these models describe
them, one per event, so each webhook in the spec names its exact ``type`` and a receiver's generated code
can switch on it. ``tests/api/test_webhook_docs.py`` checks real deliveries against these schemas.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from schemas.base import ResponseModel
from schemas.batches import BatchSummary
from schemas.jobs import Job
from schemas.webhooks import WebhookEvent

_TIMESTAMP = "When the event happened (the same on every retry of the message)."


class GenerationEvent(ResponseModel):
    """A job's event. ``data`` is the job as ``GET /v1/generations/{id}`` returns it at sending time
    (image URLs freshly signed), less ``webhook.deliveries``."""

    type: Literal[
        "generation.started",
        "generation.progress",
        "generation.succeeded",
        "generation.failed",
        "generation.canceled",
    ]
    timestamp: datetime = Field(description=_TIMESTAMP)
    data: Job


class GenerationStarted(GenerationEvent):
    """A worker took the job (``status`` running)."""

    type: Literal["generation.started"]


class GenerationProgress(GenerationEvent):
    """A denoising step ended (``progress``); at most one a second per job."""

    type: Literal["generation.progress"]


class GenerationSucceeded(GenerationEvent):
    """The job ended with its images (``status`` succeeded)."""

    type: Literal["generation.succeeded"]


class GenerationFailed(GenerationEvent):
    """The job ended without its images (``status`` failed; ``error.type`` says why)."""

    type: Literal["generation.failed"]


class GenerationCanceled(GenerationEvent):
    """The job ended on a cancel request (``status`` canceled)."""

    type: Literal["generation.canceled"]


class BatchCompleted(ResponseModel):
    """A batch's last item ended. ``data`` is the batch's status and counts, without its items (read
    them with ``GET /v1/batches/{id}``)."""

    type: Literal["batch.completed"]
    timestamp: datetime = Field(description=_TIMESTAMP)
    data: BatchSummary


#: Each event's payload model, by the event's name.
PAYLOADS: dict[WebhookEvent, type[BaseModel]] = {
    WebhookEvent.GENERATION_STARTED: GenerationStarted,
    WebhookEvent.GENERATION_PROGRESS: GenerationProgress,
    WebhookEvent.GENERATION_SUCCEEDED: GenerationSucceeded,
    WebhookEvent.GENERATION_FAILED: GenerationFailed,
    WebhookEvent.GENERATION_CANCELED: GenerationCanceled,
    WebhookEvent.BATCH_COMPLETED: BatchCompleted,
}
