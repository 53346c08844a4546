"""Client for the darkroom API: a typed Python client (:class:`DarkroomClient`) and the ``darkroom`` CLI.

Light on purpose — httpx plus the service's torch-free ``schemas`` — so it installs anywhere a user wants to
ask for images, not only where the service runs.
"""

from darkroom_client.client import (
    DEFAULT_URL,
    BatchBody,
    BatchProgressCallback,
    DarkroomClient,
    ProgressCallback,
    RequestBody,
)
from darkroom_client.errors import BatchWaitTimeout, ChecksumMismatch, DarkroomError, WaitTimeout
from darkroom_client.events import Event
from schemas.batches import (
    Batch,
    BatchCounts,
    BatchItem,
    BatchItemRequest,
    BatchList,
    BatchStatus,
    CreateBatch,
)
from schemas.generation import GenerationRequest, LoraRequest, OutputFormat, SkipLayerGuidance
from schemas.jobs import CreateGeneration, ImageResult, Job, JobStatus, Progress
from schemas.models import ServedModel
from schemas.openai_images import ImageData, ImageGenerationRequest, ImagesResponse
from schemas.outpaint import Outpaint
from schemas.problems import FieldError, Problem
from schemas.sizes import AspectRatio

__all__ = [
    "DEFAULT_URL",
    "AspectRatio",
    "Batch",
    "BatchBody",
    "BatchCounts",
    "BatchItem",
    "BatchItemRequest",
    "BatchList",
    "BatchProgressCallback",
    "BatchStatus",
    "BatchWaitTimeout",
    "ChecksumMismatch",
    "CreateBatch",
    "CreateGeneration",
    "DarkroomClient",
    "DarkroomError",
    "Event",
    "FieldError",
    "GenerationRequest",
    "ImageData",
    "ImageGenerationRequest",
    "ImageResult",
    "ImagesResponse",
    "Job",
    "JobStatus",
    "LoraRequest",
    "Outpaint",
    "OutputFormat",
    "Problem",
    "Progress",
    "ProgressCallback",
    "RequestBody",
    "ServedModel",
    "SkipLayerGuidance",
    "WaitTimeout",
]
