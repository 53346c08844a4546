"""Typed failures of the generation engine, each with the stable machine code a job reports.

The codes are part of the public contract (they appear as ``error.type`` on failed jobs): members of
``schemas.jobs.JobErrorCode``, never derived from exception class names.
"""

from __future__ import annotations

from schemas.jobs import JobErrorCode


class EngineError(Exception):
    """Base of everything the engine raises on purpose; ``code`` is what the job's error reports."""

    code: JobErrorCode = JobErrorCode.GENERATION_FAILED


class ModelUnavailableError(EngineError):
    """The configured model cannot be loaded (gated, offline, missing folder). Never silently swapped."""

    code: JobErrorCode = JobErrorCode.MODEL_UNAVAILABLE


class GenerationCanceled(EngineError):
    """Raised between denoising steps when the job was asked to stop."""

    code: JobErrorCode = JobErrorCode.CANCELED


class GenerationOutOfMemory(EngineError):
    """The device ran out of memory; the cache was freed and the engine can take the next job."""

    code: JobErrorCode = JobErrorCode.OUT_OF_MEMORY


class InvalidGenerationRequest(EngineError):
    """A request the API should have refused reached the engine anyway (defence in depth)."""

    code: JobErrorCode = JobErrorCode.INVALID_REQUEST


class ContentCheckFailed(EngineError):
    """The image classifier raised or answered nonsense: the job fails rather than pass images unchecked."""

    code: JobErrorCode = JobErrorCode.CONTENT_CHECK_FAILED


class EncodingFailed(EngineError):
    """An image could not be encoded (with its metadata) in the requested format: that job's failure only."""

    code: JobErrorCode = JobErrorCode.ENCODING_FAILED


class LoraUnavailable(EngineError):
    """A requested LoRA adapter is not on this worker's list, or its weights could not be loaded."""

    code: JobErrorCode = JobErrorCode.LORA_UNAVAILABLE
