"""The outbox's consumer: turns each event a status change appended into a delivery, in the webhook process.

For each outbox entry (``services.jobs.outbox``) it records the delivery on the job or batch
(``webhook.deliveries``, state ``pending``) and puts the first attempt on the webhook queue — then, and
only then, acknowledges the entry. Every step is safe to repeat: a delivery with the event's ``msg_id`` is
recorded once (HSETNX), and attempt 1 is enqueued only while none was made or queued. So a dispatcher that
dies anywhere in between leaves the entry pending in the consumer group, another one claims it after
``DARKROOM_OUTBOX_CLAIM_IDLE`` and finishes the work, and the receiver gets the event once (or, if the
process died after the request went out, again with the same ``webhook-id``).

It runs as a side thread of the webhook worker process (``services.webhooks.worker``): the RQ worker in
the main thread sends the attempts, this thread feeds it.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from redis import Redis
from rq import Queue
from rq.job import Job as RQJob

from services.clients import REDIS_UNAVAILABLE
from services.jobs import outbox
from services.jobs.batches import BatchStore
from services.jobs.outbox import OutboxEvent
from services.jobs.store import JobStore
from services.queue import BATCH_WEBHOOK_TASK, WEBHOOK_TASK
from services.webhooks.scheduling import enqueue_attempt, new_delivery, task_job_id

log = structlog.get_logger(__name__)

#: Entries taken per read; the first attempt of each is one small RQ enqueue.
READ_COUNT = 100
#: A consumer that holds nothing and was not seen for this long belongs to a process that is gone.
FORGET_CONSUMERS_AFTER_MS = 3_600_000


def consumer_name() -> str:
    """Unique per process incarnation, like a worker name: a restarted container keeps its hostname."""
    return f"webhooks-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class OutboxDispatcher:
    """Reads the outbox as one consumer of its group and schedules each event's first attempt."""

    redis: Redis  # a connection of its own: reads block for up to ``block``
    store: JobStore
    queue: Queue  # the webhook queue the attempts go on
    task_timeout: timedelta
    claim_idle: timedelta
    consumer: str = ""
    block: timedelta = timedelta(seconds=1)

    def __post_init__(self) -> None:
        self.consumer = self.consumer or consumer_name()
        self.batches = BatchStore(self.store.redis)
        self._next_claim = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- one event ---------------------------------------------------------------------------------------

    def handle(self, event: OutboxEvent) -> str:
        """Record the event's delivery and enqueue its first attempt, each unless done already; returns
        what happened (``scheduled``, ``already_scheduled``, or why it was skipped)."""
        bound = log.bind(msg_id=event.msg_id, webhook_event=event.type, **{f"{event.subject}_id": event.id})
        if event.subject == "job":
            record = self.store.get(event.id)
            if record is None or not record.webhook:
                bound.info("webhook.skipped", reason="job_expired")
                return "skipped"
            deliveries = self.store.deliveries(event.id)
            ttl_s = self.store.retention_s

            def add(delivery: dict[str, Any]) -> bool:
                return self.store.add_delivery(event.id, event.msg_id, delivery)

            task = WEBHOOK_TASK
        else:
            batch = self.batches.get(event.id)
            if batch is None or not batch.webhook:
                bound.info("webhook.skipped", reason="batch_expired")
                return "skipped"
            deliveries = self.batches.deliveries(event.id)
            ttl_s = batch.retention_s

            def add(delivery: dict[str, Any]) -> bool:
                return self.batches.add_delivery(event.id, event.msg_id, delivery, ttl_s)

            task = BATCH_WEBHOOK_TASK
        existing = next((d for d in deliveries if d.get("msg_id") == event.msg_id), None)
        if existing is None:
            if any(d.get("state") == "gone" for d in deliveries):
                # The receiver told us to stop (410) for an earlier event of this subject: respect it.
                bound.info("webhook.skipped", reason="receiver_gone")
                return "skipped"
            existing = new_delivery(event.type, event.msg_id, event.at)
            add(existing)
        if existing.get("state") != "pending" or existing.get("attempts"):
            return "already_scheduled"  # its attempts are under way or over
        if RQJob.exists(task_job_id(event.msg_id, 1), connection=self.queue.connection):
            return "already_scheduled"
        enqueue_attempt(self.queue, event.id, event.msg_id, 1, timeout=self.task_timeout, task=task)
        bound.info("webhook.scheduled", ttl_s=ttl_s)
        return "scheduled"

    # --- the loop ----------------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim what dead consumers left (at most every ``claim_idle / 2``), then read new entries
        (blocking up to ``block``); handle and acknowledge each. Returns how many were acknowledged."""
        entries: list[outbox.Entry] = []
        now = time.monotonic()
        if now >= self._next_claim:
            idle_ms = int(self.claim_idle.total_seconds() * 1000)
            entries += outbox.claim_stale(self.redis, self.consumer, min_idle_ms=idle_ms, count=READ_COUNT)
            outbox.forget_idle_consumers(self.redis, idle_ms=max(10 * idle_ms, FORGET_CONSUMERS_AFTER_MS))
            self._next_claim = now + self.claim_idle.total_seconds() / 2
        if not entries:
            block_ms = int(self.block.total_seconds() * 1000)
            # block_ms 0 would block forever: without a block (drain) the read returns at once
            entries = outbox.read_new(self.redis, self.consumer, count=READ_COUNT, block_ms=block_ms or None)
        done: list[str] = []
        for entry_id, event in entries:
            if event is not None:
                try:
                    self.handle(event)
                except REDIS_UNAVAILABLE:
                    raise
                except Exception:  # a bug or a corrupt record: left pending, retried after claim_idle
                    log.exception("outbox.dispatch_failed", entry_id=entry_id, msg_id=event.msg_id)
                    continue
            else:
                log.warning("outbox.unreadable_entry_dropped", entry_id=entry_id)
            done.append(entry_id)
        outbox.acknowledge(self.redis, done)
        return len(done)

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Dispatch until ``should_stop()``; a Redis outage is waited out (what was read stays pending)."""
        delay = 0.25
        while not should_stop():
            try:
                outbox.ensure_group(self.redis)
                while not should_stop():
                    self.run_once()
                    delay = 0.25
            except REDIS_UNAVAILABLE as exc:
                log.warning(
                    "redis.unavailable", operation="outbox dispatch", retry_in_s=delay, error=str(exc)
                )
            except Exception:
                log.exception("outbox.dispatcher_error", retry_in_s=delay)
            self._stop.wait(delay)
            delay = min(delay * 2, 2.0)

    def drain(self) -> int:
        """Dispatch everything in the outbox now, without waiting for more (burst mode); how many."""
        outbox.ensure_group(self.redis)
        self._next_claim = 0.0
        block, self.block = self.block, timedelta(0)
        try:
            total = 0
            while handled := self.run_once():
                total += handled
            return total
        finally:
            self.block = block

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, args=(self._stop.is_set,), name="outbox-dispatcher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current read (at most ``block``); then leave the group if nothing is pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.block.total_seconds() + 5)
        try:
            outbox.leave(self.redis, self.consumer)
        except REDIS_UNAVAILABLE:
            pass
