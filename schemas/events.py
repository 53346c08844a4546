"""The events of a job's Server-Sent Events stream (``GET /v1/generations/{id}/events``).

Each frame carries an ``id`` (resume with ``Last-Event-ID``), an ``event`` name and one line of JSON
``data``: ``status`` for every status change, ``progress`` for denoising steps, and finally one ``job``
with the whole job as ``GET /v1/generations/{id}`` returns it, after which the server closes the stream.
:data:`STREAM_EVENT_DATA` is the contract for each event's ``data``; the OpenAPI document describes the
frames from it (``GenerationStreamEvent``).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from schemas.base import ResponseModel
from schemas.jobs import Job, JobStatus, Progress


class StatusChange(ResponseModel):
    """``data`` of a ``status`` event: the job moved to ``status`` at ``at``."""

    status: JobStatus
    at: datetime


STREAM_EVENT_DATA: dict[str, type[BaseModel]] = {"status": StatusChange, "progress": Progress, "job": Job}
"""Each event name of the stream, and the model of its ``data``."""
