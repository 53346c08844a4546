"""Typed failures of the generation engine, each with the stable machine code a job reports.

The codes are part of the public contract (they appear as ``error.type`` on failed jobs), so they are
plain strings defined once here and never derived from exception class names.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of everything the engine raises on purpose; ``code`` is what the job's error reports."""

    code = "generation_failed"


class ModelUnavailableError(EngineError):
    """The configured model cannot be loaded (gated, offline, missing folder). Never silently swapped."""

    code = "model_unavailable"


class GenerationCanceled(EngineError):
    """Raised between denoising steps when the job was asked to stop."""

    code = "canceled"


class GenerationOutOfMemory(EngineError):
    """The device ran out of memory; the cache was freed and the engine can take the next job."""

    code = "out_of_memory"


class InvalidGenerationRequest(EngineError):
    """A request the API should have refused reached the engine anyway (defence in depth)."""

    code = "invalid_request"


class ContentCheckFailed(EngineError):
    """The image classifier raised or answered nonsense: the job fails rather than pass images unchecked."""

    code = "content_check_failed"


class LoraUnavailable(EngineError):
    """A requested LoRA adapter is not on this worker's list, or its weights could not be loaded."""

    code = "lora_unavailable"
