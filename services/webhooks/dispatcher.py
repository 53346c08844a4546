"""The outbox's consumer: turns each event a status change appended into a delivery, in the webhook process.

For each outbox entry (``services.jobs.outbox``) it records the delivery on the job or batch
(``webhook.deliveries``, state ``pending``) and makes the first attempt — then, and only then,
acknowledges the entry. In the webhook process the first attempt is sent straight from here, by a pool
of ``DARKROOM_WEBHOOK_DISPATCH_CONCURRENCY`` threads (``send_first``): an RQ task per attempt cost ~75
Redis commands and a lot of Python, and held one process to under 100 deliveries a second against
receivers answering in 150 ms (``bench/webhook_rate.py``). The unacknowledged outbox entry is the
attempt's record of being under way — what the RQ task's registry entry was: should the process die
mid-attempt, the entry is claimed by another after ``DARKROOM_OUTBOX_CLAIM_IDLE`` and the attempt made
again with the same ``webhook-id``. Retries, and attempts put back for want of a slot on a busy host or
key, still go on the webhook queue (``services.webhooks.tasks``). Without ``send_first`` (tests, older
callers) attempt 1 goes on the queue too.

Every step is safe to repeat: a delivery with the event's ``msg_id`` is recorded once (HSETNX), and
attempt 1 is sent (or enqueued) only while none was made or queued. So a dispatcher that
dies anywhere in between leaves the entry pending in the consumer group, another one claims it after
``DARKROOM_OUTBOX_CLAIM_IDLE`` and finishes the work, and the receiver gets the event once (or, if the
process died after the request went out, again with the same ``webhook-id``).

It runs as a side thread of the webhook worker process (``services.webhooks.worker``): the RQ worker in
the main thread sends retries, this thread and its pool send first attempts.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from redis import Redis
from rq import Queue
from rq.job import Job as RQJob

from services.clients import REDIS_UNAVAILABLE, retry_while_redis_down
from services.jobs import outbox
from services.jobs.batches import BatchStore
from services.jobs.outbox import OutboxEvent
from services.jobs.store import JobStore
from services.queue import BATCH_WEBHOOK_TASK, WEBHOOK_TASK
from services.webhooks.scheduling import enqueue_attempt, new_delivery, task_job_id

log = structlog.get_logger(__name__)

#: Entries taken per read at most.
READ_COUNT = 100
#: What ``handle`` returns when the caller is to send attempt 1 itself (``send_first``).
SEND = "send"
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
    #: Sends attempt 1 of (task, subject id, msg_id) in the calling thread; None: enqueue it instead.
    send_first: Callable[[str, str, str], object] | None = None
    #: First attempts in flight at once when ``send_first`` is set (the pool's threads).
    concurrency: int = 64

    def __post_init__(self) -> None:
        self.consumer = self.consumer or consumer_name()
        self.batches = BatchStore(self.store.redis)
        self._next_claim = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._free = self.concurrency  # pool threads not sending; guarded by ``_slots``
        self._acknowledged = 0  # entries the pool acknowledged; guarded by ``_slots``
        self._slots = threading.Condition()
        self._pool: ThreadPoolExecutor | None = None
        if self.send_first is not None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="webhook-send")

    # --- one event ---------------------------------------------------------------------------------------

    def handle(self, event: OutboxEvent) -> str:
        """Record the event's delivery and enqueue its first attempt, each unless done already; returns
        what happened (``scheduled``, ``already_scheduled``, or why it was skipped). With ``send_first``
        nothing is enqueued: ``send`` means the caller is to make attempt 1 (then acknowledge)."""
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
        if self.send_first is not None:
            return SEND
        enqueue_attempt(self.queue, event.id, event.msg_id, 1, timeout=self.task_timeout, task=task)
        bound.info("webhook.scheduled", ttl_s=ttl_s)
        return "scheduled"

    # --- first attempts in the pool ----------------------------------------------------------------------

    def _wait_for_room(self) -> int:
        """How many entries to read now: ``READ_COUNT``, or with a pool, as many as it has threads free
        (waited for up to ``block``) — an entry read is an attempt about to start, never one queued behind
        others while its claim-idle clock runs."""
        if self._pool is None:
            return READ_COUNT
        with self._slots:
            self._slots.wait_for(lambda: self._free > 0 or self._stop.is_set(), self.block.total_seconds())
            return 0 if self._stop.is_set() else min(READ_COUNT, self._free)

    def _hand_to_pool(self, entry_id: str, event: OutboxEvent | None) -> None:
        assert self._pool is not None
        with self._slots:
            self._free -= 1
        self._pool.submit(self._dispatch_one, entry_id, event)

    def _dispatch_one(self, entry_id: str, event: OutboxEvent | None) -> None:
        """In a pool thread: ``handle`` the entry's event, make attempt 1 if it is due, then acknowledge
        the entry. Handling in the pool, not the reading thread, lets the Redis round trips of many events
        overlap. An error (Redis gone past its retry deadline, a bug, a corrupt record) leaves the entry
        pending: it is claimed again after ``claim_idle`` and each step redone unless done already."""
        assert self.send_first is not None
        try:
            if event is None:
                log.warning("outbox.unreadable_entry_dropped", entry_id=entry_id)
            elif self._handle_riding_out_redis(event) == SEND:
                task = BATCH_WEBHOOK_TASK if event.subject == "batch" else WEBHOOK_TASK
                self.send_first(task, event.id, event.msg_id)
            outbox.acknowledge(self.store.redis, [entry_id])
            with self._slots:
                self._acknowledged += 1
        except Exception:
            msg_id = event.msg_id if event is not None else None
            log.exception("outbox.dispatch_failed", entry_id=entry_id, msg_id=msg_id)
        finally:
            with self._slots:
                self._free += 1
                self._slots.notify_all()

    def _handle_riding_out_redis(self, event: OutboxEvent) -> str:
        """``handle``, retried through a Redis blip for up to half ``claim_idle``: past that the entry
        is left pending, to be claimed again, rather than held by a thread that waits."""
        return retry_while_redis_down(
            lambda: self.handle(event),
            what="outbox dispatch",
            deadline_s=self.claim_idle.total_seconds() / 2,
            should_stop=self._stop.is_set,
        )

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no first attempt is in flight; whether that happened within ``timeout``."""
        with self._slots:
            return self._slots.wait_for(lambda: self._free >= self.concurrency, timeout)

    # --- the loop ----------------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim what dead consumers left (at most every ``claim_idle / 2``), then read new entries
        (blocking up to ``block``); handle and acknowledge each. Returns how many were handled: acknowledged,
        or (with ``send_first``) handed to the pool, which acknowledges each when its attempt ends."""
        entries: list[outbox.Entry] = []
        room = self._wait_for_room()
        if room == 0:
            return 0
        now = time.monotonic()
        if now >= self._next_claim:
            idle_ms = int(self.claim_idle.total_seconds() * 1000)
            entries += outbox.claim_stale(self.redis, self.consumer, min_idle_ms=idle_ms, count=room)
            outbox.forget_idle_consumers(self.redis, idle_ms=max(10 * idle_ms, FORGET_CONSUMERS_AFTER_MS))
            self._next_claim = now + self.claim_idle.total_seconds() / 2
        if not entries:
            block_ms = int(self.block.total_seconds() * 1000)
            # block_ms 0 would block forever: without a block (drain) the read returns at once
            entries = outbox.read_new(self.redis, self.consumer, count=room, block_ms=block_ms or None)
        if self._pool is not None:
            for entry_id, event in entries:
                self._hand_to_pool(entry_id, event)
            return len(entries)
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
        """Dispatch everything in the outbox now, without waiting for more (burst mode); how many were
        acknowledged (an event whose handling failed stays pending and is not counted)."""
        outbox.ensure_group(self.redis)
        self._next_claim = 0.0
        block, self.block = self.block, timedelta(0)
        try:
            total = 0
            while True:
                before = self._acknowledged
                handled = self.run_once()
                if self._pool is not None:
                    self.wait_idle()  # the pool's attempts acknowledge their entries as they end
                    handled = self._acknowledged - before  # one that failed is not done
                if not handled:
                    return total
                total += handled
        finally:
            self.block = block

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, args=(self._stop.is_set,), name="outbox-dispatcher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current read (at most ``block``) and let the first attempts in flight end (each
        within the attempt deadline) and be recorded; then leave the group if nothing is pending."""
        self._stop.set()
        with self._slots:
            self._slots.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.block.total_seconds() + 5)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        try:
            outbox.leave(self.redis, self.consumer)
        except REDIS_UNAVAILABLE:
            pass
