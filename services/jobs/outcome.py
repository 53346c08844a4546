"""How a run ended, as a typed value: what the worker (or cancel, or recovery) hands the lifecycle.

A job's terminal status and the fields written with it are decided together, so they are one object
rather than a ``(status, dict)`` pair that could disagree. ``record_fields()`` is the stored form the job hash
takes (``services.jobs.records.encode_fields`` turns it into hash values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.jobs import JobErrorCode, JobStatus


@dataclass(frozen=True)
class Succeeded:
    """The run finished: its images (stored, or listed as ``content_filtered``) and what it reported."""

    images: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    token_counts: dict[str, Any] | None = None
    timings: dict[str, float] | None = None

    status = JobStatus.SUCCEEDED

    def record_fields(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "warnings": self.warnings,
            "token_counts": self.token_counts,
            "timings": self.timings,
        }


@dataclass(frozen=True)
class Failed:
    """The run ended without images, for a reason a client can act on (``code``)."""

    code: JobErrorCode
    message: str

    status = JobStatus.FAILED

    def record_fields(self) -> dict[str, Any]:
        return {"error": {"type": self.code.value, "message": self.message}}


@dataclass(frozen=True)
class Canceled:
    """Someone asked the job to stop, and it did (before or during its run)."""

    message: str

    status = JobStatus.CANCELED

    def record_fields(self) -> dict[str, Any]:
        return {"error": {"type": JobErrorCode.CANCELED.value, "message": self.message}}


Outcome = Succeeded | Failed | Canceled
