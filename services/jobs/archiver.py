"""Moves finished jobs and batches out of Redis: archive to storage first, then a short EXPIRE.

Who archives what: the terminal transition (``services.jobs.lifecycle``) adds ``job:{id}`` — and, for a
batch's last item, ``batch:{id}`` — to ``darkroom:archive:due`` (a sorted set by due time) in the same
atomic step as the status change, so no finished job can be missed. This loop, one process at a time
(``darkroom:archive:lease``, renewed while it works), takes the due entries in order and for each:

1. reads the record; gone (expired, or trimmed by an earlier run): the entry is dropped;
2. waits while its webhook events are not settled — a delivery record still ``pending``, or the record of
   an event it emitted (its terminal event, ``generation.started``) not yet made by the outbox dispatcher
   (``webhooks_settled``): the entry is postponed (by about the time the
   job has waited, 5 s to 5 min: O(checks) stays small for slow receivers). After half the retention it
   is archived anyway, pending deliveries and all, rather than lost with the Redis keys;
3. a batch item waits for its batch: it is dropped from the set while the batch is unarchived (atomically
   with the batch's archiving, in a script), and the
   batch's archiving puts all of its items back, due at once (a batch page reads its items from Redis
   while the batch is there);
4. writes the archive object (idempotent: the same key, the whole document);
5. in one MULTI: sets ``DARKROOM_FINISHED_TTL`` on the record's keys (a batch: marks its hash
   ``archived_at`` and re-adds its items) and removes the entry.

A crash between 4 and 5 leaves the entry due: the next run writes the same object again and trims. Work
is O(archived + postponed), never a scan. A second process waits for the lease; should two ever overlap
(a lease lost mid-run), both write the same object and set the same TTL.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import structlog
from redis import Redis

from schemas.webhooks import WebhookEvent, canonical_events
from services.clients import REDIS_UNAVAILABLE
from services.jobs.archive import JobArchive, snapshot_batch, snapshot_job, sweep_files
from services.jobs.keys import (
    ARCHIVE_DUE,
    ARCHIVE_LEASE,
    batch_key,
    batch_webhooks_key,
    done_key,
    events_key,
    items_key,
    job_key,
    webhooks_key,
)
from services.jobs.records import utcnow
from services.storage import FileStorage, RetryingStorage, Storage

log = structlog.get_logger(__name__)

#: Entries taken per pass.
BATCH_SIZE = 100
_MIN_POSTPONE_S = 5.0
_MAX_POSTPONE_S = 300.0
_SWEEP_EVERY_S = 86_400.0

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: 1 the item's batch hash, 2 the due set; ARGV: 1 the item's entry. Atomic with the batch's archiving
# (which marks ``archived_at`` and re-adds its items in one MULTI): an item is dropped only while its batch
# is unarchived, so it is always re-added after.
_WAIT_FOR_BATCH = """
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('HEXISTS', KEYS[1], 'archived_at') == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def webhooks_settled(deliveries: list[dict[str, Any]], awaited: Iterable[str] = ()) -> bool:
    """Whether nothing more will happen to these delivery records: none is ``pending`` and each event in
    ``awaited`` (what the subject's webhook subscribed to and the subject emitted: ``generation.started``,
    its terminal event) has its record — made by the outbox dispatcher a moment after the event — or the
    receiver said 410 (``gone``), after which the dispatcher makes no more records. ``progress`` events
    are not awaited: how many were sent is not kept."""
    if any(delivery.get("state") == "pending" for delivery in deliveries):
        return False
    if any(delivery.get("state") == "gone" for delivery in deliveries):
        return True
    recorded = {delivery.get("event") for delivery in deliveries}
    return all(event in recorded for event in awaited)


def _awaited(webhook: dict[str, Any] | None, *emitted: str) -> list[str]:
    """Of the events ``emitted``, those the webhook subscribed to."""
    if not webhook:
        return []
    subscribed = canonical_events(webhook.get("events", []))
    return [event for event in emitted if event in subscribed]


@dataclass
class Archiver:
    """One pass (``run_once``) or a loop in a side thread (``start``/``stop``) of the webhook process."""

    redis: Redis
    archive: JobArchive
    finished_ttl: timedelta
    lease: timedelta = timedelta(seconds=30)
    interval: timedelta = timedelta(seconds=1)
    batch_size: int = BATCH_SIZE
    #: Entries of a pass archived at once (threads: the work is waiting on storage and Redis).
    concurrency: int = 16
    #: The ``file://`` root to sweep archives past retention from, daily (None: S3 lifecycle does it).
    sweep_root: Path | None = None
    token: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self._wait_for_batch = self.redis.register_script(_WAIT_FOR_BATCH)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_sweep = 0.0
        # Never longer than the retention the keys already had.
        self.ttl_s = max(1, int(min(self.finished_ttl, self.archive.retention).total_seconds()))

    # --- the lease -----------------------------------------------------------------------------------------

    def hold_lease(self) -> bool:
        """Take the lease, or renew it if this archiver holds it; False while another one does."""
        lease_ms = int(self.lease.total_seconds() * 1000)
        if self._renew(keys=[ARCHIVE_LEASE], args=[self.token, lease_ms]):
            return True
        return bool(self.redis.set(ARCHIVE_LEASE, self.token, nx=True, px=lease_ms))

    def release_lease(self) -> None:
        """Hand the lease back (if still ours), so another process takes over at once."""
        self._release(keys=[ARCHIVE_LEASE], args=[self.token])

    # --- one pass ------------------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Archive what is due (up to ``batch_size``) if this archiver holds the lease; how many."""
        if not self.hold_lease():
            return 0
        now_ms = int(time.time() * 1000)
        due = cast(list[bytes], self.redis.zrangebyscore(ARCHIVE_DUE, "-inf", now_ms, 0, self.batch_size))
        members = [raw.decode() for raw in due]
        if len(members) <= 1:
            outcomes = [self._one(member) for member in members]
        else:  # each is a storage write of tens of ms on S3: several at once keep up with the fleet
            with ThreadPoolExecutor(min(self.concurrency, len(members)), "archiver") as pool:
                outcomes = list(pool.map(self._one, members))
        return outcomes.count("archived")

    def _one(self, member: str) -> str:
        kind, _, subject = member.partition(":")
        try:
            return self.archive_batch(subject) if kind == "batch" else self.archive_job(subject)
        except REDIS_UNAVAILABLE:
            raise
        except Exception:  # a storage outage or a corrupt record: left due, retried next pass
            log.exception("archive.failed", member=member)
            return "failed"

    def archive_job(self, job_id: str) -> str:
        """Archive one job and trim its keys; what happened (archived, postponed, waiting_for_batch, gone)."""
        member = f"job:{job_id}"
        document = snapshot_job(self.redis, job_id)
        if document is None:
            self.redis.zrem(ARCHIVE_DUE, member)
            return "gone"
        fields = document["job"]
        batch_id = fields.get("batch_id")
        if batch_id and self._wait_for_batch(keys=[batch_key(batch_id), ARCHIVE_DUE], args=[member]):
            return "waiting_for_batch"  # re-added, due at once, when the batch is archived
        webhook = _json(fields.get("webhook"))
        emitted = [f"generation.{fields.get('status')}"]
        if fields.get("started_at"):  # it ran (a job canceled while queued never started)
            emitted.append(WebhookEvent.GENERATION_STARTED.value)
        awaited = _awaited(webhook, *emitted)
        if self._postponed(member, document["webhooks"], awaited, fields.get("completed_at")):
            return "postponed"
        size = self.archive.put(document)
        with self.redis.pipeline(transaction=True) as pipe:
            for key in (job_key(job_id), events_key(job_id), webhooks_key(job_id), done_key(job_id)):
                pipe.expire(key, self.ttl_s)
            pipe.zrem(ARCHIVE_DUE, member)
            pipe.execute()
        log.debug("archive.job", job_id=job_id, bytes=size)
        return "archived"

    def archive_batch(self, batch_id: str) -> str:
        """Archive one batch, trim its keys and make its items due; what happened."""
        member = f"batch:{batch_id}"
        document = snapshot_batch(self.redis, batch_id)
        if document is None:
            self.redis.zrem(ARCHIVE_DUE, member)
            return "gone"
        fields = document["batch"]
        awaited = _awaited(_json(fields.get("webhook")), WebhookEvent.BATCH_COMPLETED.value)
        if self._postponed(member, document["webhooks"], awaited, fields.get("completed_at")):
            return "postponed"
        size = self.archive.put(document)
        now_ms = int(time.time() * 1000)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(batch_key(batch_id), "archived_at", utcnow().isoformat())
            for key in (batch_key(batch_id), items_key(batch_id), batch_webhooks_key(batch_id)):
                pipe.expire(key, self.ttl_s)
            if document["items"]:
                pipe.zadd(ARCHIVE_DUE, {f"job:{item}": now_ms for item in document["items"]}, nx=True)
            pipe.zrem(ARCHIVE_DUE, member)
            pipe.execute()
        log.debug("archive.batch", batch_id=batch_id, bytes=size, items=len(document["items"]))
        return "archived"

    def _postponed(
        self, member: str, deliveries: list[dict[str, Any]], awaited: list[str], completed_at: str | None
    ) -> bool:
        """Postpone ``member`` if its webhooks are not settled (and it has not waited half the retention)."""
        if webhooks_settled(deliveries, awaited):
            return False
        waited_s = (utcnow() - datetime.fromisoformat(completed_at)).total_seconds() if completed_at else 0.0
        if waited_s >= self.archive.retention.total_seconds() / 2:
            log.warning("archive.webhooks_unsettled", member=member, waited_s=int(waited_s))
            return False
        delay_s = min(max(waited_s, _MIN_POSTPONE_S), _MAX_POSTPONE_S)
        self.redis.zadd(ARCHIVE_DUE, {member: int((time.time() + delay_s) * 1000)}, xx=True)
        return True

    # --- the loop ------------------------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Archive until ``should_stop()``; a full pass goes on at once, otherwise waits ``interval``."""
        while not should_stop():
            wait = self.interval.total_seconds()
            try:
                if self.run_once() >= self.batch_size:
                    wait = 0.0
                self._sweep()
            except REDIS_UNAVAILABLE as exc:
                log.warning("redis.unavailable", operation="archive", error=str(exc))
            except Exception:
                log.exception("archive.loop_error")
            self._stop.wait(wait)

    def _sweep(self) -> None:
        if self.sweep_root is None or time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + _SWEEP_EVERY_S
        removed = sweep_files(self.sweep_root, self.archive.retention)
        log.info("archive.swept", removed=removed)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, args=(self._stop.is_set,), name="archiver", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval.total_seconds() + 10)
        try:
            self.release_lease()
        except REDIS_UNAVAILABLE:
            pass


def _json(value: str | None) -> Any:
    return json.loads(value) if value else None


def file_root(storage: Storage) -> Path | None:
    """The folder of a ``file://`` storage (for ``Archiver.sweep_root``); None for S3."""
    inner = storage.inner if isinstance(storage, RetryingStorage) else storage
    return inner.root if isinstance(inner, FileStorage) else None
