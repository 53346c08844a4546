"""A job as stored in its Redis hash, and the small codecs every reader and writer of it shares."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas.jobs import JobStatus
from schemas.webhooks import WebhookEvent, canonical_events

log = logging.getLogger(__name__)


def new_job_id() -> str:
    return "gen_" + secrets.token_hex(16)


def utcnow() -> datetime:
    return datetime.now(UTC)


def beat_ms(moment: datetime) -> str:
    """``moment`` as whole milliseconds since the epoch: a job's score in the running set (its last sign
    of life, on the clock of the worker that wrote ``heartbeat_at``), as the Lua scripts store it."""
    return str(int(moment.timestamp() * 1000))


@dataclass
class JobRecord:
    """A job as stored: keys, not URLs. ``request`` is the normalised request without the init image."""

    id: str
    status: JobStatus
    created_at: datetime
    request: dict[str, Any]
    started_at: datetime | None = None
    completed_at: datetime | None = None
    progress: dict[str, int] | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    token_counts: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    webhook: dict[str, Any] | None = None
    init_image_key: str | None = None
    mask_image_key: str | None = None  # inpainting: the uploaded mask, beside the init image
    cancel_requested: bool = False
    worker: str | None = None
    timings: dict[str, float] | None = None
    heartbeat_at: datetime | None = None
    attempt: int = 1
    owner: str = "anonymous"  # the API key name that created the job; other keys get 404 for it
    batch_id: str | None = None  # the batch (POST /v1/batches) this job is an item of
    # Its place in its queue's order (services.queue_order): the enqueue sequence number admission (or a
    # requeue) gave it, and the hash of its queue's counters. None for records admitted before them.
    queue_seq: int | None = None
    queue_order: str | None = None

    def creation_fields(self) -> dict[str, Any]:
        """What a new job's hash starts with (the admission scripts, and tests that build jobs)."""
        return {
            "status": self.status.value,
            "created_at": self.created_at,
            "request": self.request,
            "owner": self.owner,
            **({"webhook": self.webhook} if self.webhook else {}),
            **({"init_image_key": self.init_image_key} if self.init_image_key else {}),
            **({"mask_image_key": self.mask_image_key} if self.mask_image_key else {}),
            **({"batch_id": self.batch_id} if self.batch_id else {}),
        }

    def subscribes(self, event: WebhookEvent) -> bool:
        """Whether this job's webhook asked for ``event`` — by its name or, in a record stored before
        the names were unified, by an alias."""
        return bool(self.webhook) and event in canonical_events((self.webhook or {}).get("events", []))

    @classmethod
    def from_stored(cls, job_id: str, raw: Mapping[bytes, bytes]) -> JobRecord | None:
        """The record in ``raw`` (a job hash as read), or None if there is no whole record there: an
        empty or partial hash (a write that landed after Redis lost the record, say) is no job, for
        every reader alike (a 404 for the API, "job gone" for the worker), never a crash."""
        if not raw or b"status" not in raw or b"created_at" not in raw:
            if raw:
                log.warning("job %s: partial record without status/created_at ignored", job_id)
            return None
        try:
            return cls.from_hash(job_id, raw)
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            log.warning("job %s: unreadable record ignored: %s", job_id, exc)
            return None

    @classmethod
    def from_hash(cls, job_id: str, raw: Mapping[bytes, bytes]) -> JobRecord:
        data = {key.decode(): value.decode() for key, value in raw.items()}

        def loads(name: str) -> Any:
            return json.loads(data[name]) if data.get(name) else None

        def when(name: str) -> datetime | None:
            return datetime.fromisoformat(data[name]) if data.get(name) else None

        return cls(
            id=job_id,
            status=JobStatus(data["status"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            request=loads("request"),
            started_at=when("started_at"),
            completed_at=when("completed_at"),
            progress=loads("progress"),
            images=loads("images") or [],
            warnings=loads("warnings") or [],
            token_counts=loads("token_counts"),
            error=loads("error"),
            webhook=loads("webhook"),
            init_image_key=data.get("init_image_key") or None,
            mask_image_key=data.get("mask_image_key") or None,
            cancel_requested=data.get("cancel_requested") == "1",
            worker=data.get("worker") or None,
            timings=loads("timings"),
            heartbeat_at=when("heartbeat_at"),
            attempt=int(data.get("attempt") or 1),
            owner=data.get("owner") or "anonymous",
            batch_id=data.get("batch_id") or None,
            queue_seq=int(data["queue_seq"]) if data.get("queue_seq") else None,
            queue_order=data.get("queue_order") or None,
        )


def encode_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """Hash values: datetimes as ISO strings, strings as is, everything else as JSON."""
    encoded = {}
    for name, value in fields.items():
        if isinstance(value, datetime):
            encoded[name] = value.isoformat()
        elif isinstance(value, str):
            encoded[name] = value
        else:
            # UTF-8 as is: an emoji stored escaped ("\\ud83d\\ude00") takes 12 bytes instead of 4.
            encoded[name] = json.dumps(value, ensure_ascii=False)
    return encoded


def decode_deliveries(raw: Mapping[bytes, bytes]) -> list[dict[str, Any]]:
    """Webhook delivery records (a job's or a batch's), oldest first; for the sync and async readers."""
    records = [json.loads(value) for value in raw.values()]
    return sorted(records, key=lambda record: record.get("created_at", ""))


def decode_event(values: Mapping[bytes, bytes]) -> dict[str, Any]:
    """A job stream entry as {type, data}; shared by the sync store and the API's async stream reader."""
    return {"type": values[b"type"].decode(), "data": json.loads(values[b"data"])}
