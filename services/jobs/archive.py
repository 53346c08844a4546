"""Finished jobs and batches as archived to storage: one JSON object each, what every read needs.

Redis holds a job for minutes after it ends (``services.jobs.archiver`` writes the archive, then lets the
keys expire after ``DARKROOM_FINISHED_TTL``); from then on reads fall through to the object this module
writes and reads, within ``DARKROOM_JOB_RETENTION`` (``completed_at`` + retention: 404 after, whether or not
the object is still there). Keys are flat by id (``records/jobs/{id}.json``, ``records/batches/{id}.json``)
because a read knows only the id; the images' date-partitioned keys need the creation date. One prefix,
``records/``, so an S3 lifecycle rule expires them (docs/operate/deploy.md); ``sweep_files`` does it for a
``file://`` store.

An object holds the Redis hash's fields as stored (so ``JobRecord.from_stored`` and
``BatchRecord.from_hash`` read it as they read Redis), the event stream (SSE replays it) and the webhook
delivery records; a batch's also its item ids and their final statuses. Writing is idempotent (the same
key, the whole object), so an archiver may redo it after a crash.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from redis import Redis

from services.jobs.batches import BatchRecord, item_statuses_from
from services.jobs.keys import batch_key, batch_webhooks_key, events_key, items_key, job_key, webhooks_key
from services.jobs.records import JobRecord, decode_deliveries, decode_event, utcnow
from services.storage import ObjectNotFound, Storage

#: Where archived records live in the storage, beside ``generations/`` (the images).
RECORDS_PREFIX = "records/"
_CONTENT_TYPE = "application/json"
_VERSION = 1


def job_object_key(job_id: str) -> str:
    return f"{RECORDS_PREFIX}jobs/{job_id}.json"


def batch_object_key(batch_id: str) -> str:
    return f"{RECORDS_PREFIX}batches/{batch_id}.json"


@dataclass(frozen=True)
class ArchivedJob:
    record: JobRecord
    events: list[tuple[str, dict[str, Any]]]  # (stream id, {type, data}) as ``JobStore.events_since``
    deliveries: list[dict[str, Any]]

    def events_after(self, last_id: str) -> list[tuple[str, dict[str, Any]]]:
        """The events after stream id ``last_id`` (``0-0``: all), as an XREAD from it would return."""
        after = _stream_id(last_id)
        return [(entry_id, event) for entry_id, event in self.events if _stream_id(entry_id) > after]


@dataclass(frozen=True)
class ArchivedBatch:
    record: BatchRecord
    item_ids: list[str]
    statuses: list[str | None]  # each item's status when the batch was archived (all ended)
    deliveries: list[dict[str, Any]]


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _text(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    return {key.decode(): value.decode() for key, value in raw.items()}


def _encoded(fields: Mapping[str, str]) -> dict[bytes, bytes]:
    return {key.encode(): value.encode() for key, value in fields.items()}


# --- what Redis holds now, as an archive document ------------------------------------------------------


def snapshot_job(redis: Redis, job_id: str) -> dict[str, Any] | None:
    """The job's archive document from its Redis keys (one round trip); None if its hash is gone."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(job_key(job_id))
        pipe.xrange(events_key(job_id))
        pipe.hgetall(webhooks_key(job_id))
        raw_job, raw_events, raw_deliveries = pipe.execute()
    if not raw_job:
        return None
    events = [{"id": entry_id.decode(), **decode_event(values)} for entry_id, values in raw_events]
    return {
        "version": _VERSION,
        "kind": "job",
        "id": job_id,
        "archived_at": utcnow().isoformat(),
        "job": _text(raw_job),
        "events": events,
        "webhooks": decode_deliveries(raw_deliveries),
    }


def snapshot_batch(redis: Redis, batch_id: str) -> dict[str, Any] | None:
    """The batch's archive document (two round trips: the items' statuses follow their ids)."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(batch_key(batch_id))
        pipe.lrange(items_key(batch_id), 0, -1)
        pipe.hgetall(batch_webhooks_key(batch_id))
        raw_batch, raw_ids, raw_deliveries = pipe.execute()
    if not raw_batch:
        return None
    ids = [raw.decode() for raw in raw_ids]
    with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(job_key(job_id), "status")
        statuses = item_statuses_from(cast(list[bytes | None], pipe.execute()))
    fields = _text(raw_batch)
    fields.pop("archived_at", None)  # the archiver's mark, not the batch's
    return {
        "version": _VERSION,
        "kind": "batch",
        "id": batch_id,
        "archived_at": utcnow().isoformat(),
        "batch": fields,
        "items": ids,
        "statuses": statuses,
        "webhooks": decode_deliveries(raw_deliveries),
    }


# --- the archive in storage ----------------------------------------------------------------------------


class JobArchive:
    """Writes and reads archive objects. Sync (storage is): the API calls it from the threadpool.
    ``retention``: how long after it ended a job or batch stays readable."""

    def __init__(self, storage: Storage, retention: timedelta) -> None:
        self.storage = storage
        self.retention = retention

    def put(self, document: Mapping[str, Any]) -> int:
        """Store a ``snapshot_*`` document (replacing any earlier one); its size in bytes."""
        key = job_object_key if document["kind"] == "job" else batch_object_key
        data = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        self.storage.put(key(str(document["id"])), data, _CONTENT_TYPE)
        return len(data)

    def job(self, job_id: str, *, now: datetime | None = None) -> ArchivedJob | None:
        """The archived job, or None: never archived, or ended more than the retention ago."""
        document = self._read(job_object_key(job_id))
        if document is None:
            return None
        record = JobRecord.from_stored(job_id, _encoded(document["job"]))
        if record is None or self._expired(record.completed_at, now):
            return None
        events = [(e["id"], {"type": e["type"], "data": e["data"]}) for e in document["events"]]
        return ArchivedJob(record=record, events=events, deliveries=list(document["webhooks"]))

    def batch(self, batch_id: str, *, now: datetime | None = None) -> ArchivedBatch | None:
        """The archived batch, or None: never archived, or completed more than the retention ago."""
        document = self._read(batch_object_key(batch_id))
        if document is None:
            return None
        record = BatchRecord.from_hash(batch_id, _encoded(document["batch"]))
        if self._expired(record.completed_at, now):
            return None
        return ArchivedBatch(
            record=record,
            item_ids=list(document["items"]),
            statuses=list(document["statuses"]),
            deliveries=list(document["webhooks"]),
        )

    def _expired(self, completed_at: datetime | None, now: datetime | None) -> bool:
        return completed_at is None or completed_at + self.retention <= (now or utcnow())

    def _read(self, key: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], json.loads(self.storage.read(key)))
        except ObjectNotFound:
            return None


def sweep_files(root: Path, retention: timedelta, *, margin: timedelta = timedelta(days=1)) -> int:
    """Delete ``file://`` archive objects written more than ``retention + margin`` ago (S3 does it with a
    lifecycle rule instead); how many. Reads already answer 404 past the retention, so this only frees
    disk: run it daily (the archiver does). A file's mtime is when its record was archived."""
    cutoff = time.time() - (retention + margin).total_seconds()
    removed = 0
    folder = root / RECORDS_PREFIX
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
    return removed
