"""The outbox's consumer: turns each event a status change appended into a delivery, in the webhook process.

For each outbox entry (``services.jobs.outbox``) it records the delivery on the job or batch
(``webhook.deliveries``, state ``pending``) and makes the first attempt — then, and only then,
acknowledges the entry. In the webhook process the first attempt is sent by a
:class:`~services.webhooks.first_attempts.FirstAttemptSender` (one event loop, ``DARKROOM_WEBHOOK_DISPATCH_
CONCURRENCY`` attempts in flight), which acknowledges the entry once the attempt is recorded: the
unacknowledged entry is the attempt's record of being under way — should the process die mid-attempt,
the entry is claimed by another after ``DARKROOM_OUTBOX_CLAIM_IDLE`` and the attempt made again with the
same ``webhook-id``. Retries go on the webhook queue (``services.webhooks.tasks``); attempts that found
no slot on a busy host or key are parked until one comes free (``services.webhooks.parking``). Without
a sender (tests, burst tools) attempt 1 goes on the queue too.

The reads and writes for the events of one read are batched: one pipelined round trip reads every job (or
batch) record, its deliveries and whether its first attempt is queued, one records the new deliveries.
Per-event round trips held one process to under 200 deliveries a second (``bench/webhook_rate.py``).

Every step is safe to repeat: a delivery with the event's ``msg_id`` is recorded once (HSETNX), and
attempt 1 is sent (or enqueued) only while none was made or queued. So a dispatcher that
dies anywhere in between leaves the entry pending in the consumer group, another one claims it after
``DARKROOM_OUTBOX_CLAIM_IDLE`` and finishes the work, and the receiver gets the event once (or, if the
process died after the request went out, again with the same ``webhook-id``).

It runs as a side thread of the webhook worker process (``services.webhooks.worker``): the RQ worker in
the main thread sends retries, this thread reads the outbox and hands first attempts to the sender.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import structlog
from redis import Redis
from rq import Queue
from rq.job import Job as RQJob

from services.clients import REDIS_UNAVAILABLE
from services.jobs import outbox
from services.jobs.batches import BatchRecord
from services.jobs.keys import batch_key, batch_webhooks_key, job_key, webhooks_key
from services.jobs.outbox import OutboxEvent
from services.jobs.records import JobRecord, decode_deliveries
from services.jobs.store import JobStore
from services.queue import BATCH_WEBHOOK_TASK, WEBHOOK_TASK
from services.webhooks.first_attempts import FirstAttemptSender
from services.webhooks.scheduling import enqueue_attempt, new_delivery, task_job_id
from services.webhooks.tasks import batch_subject, job_subject

log = structlog.get_logger(__name__)

#: Entries taken per read at most.
READ_COUNT = 100
#: What ``handle`` returns when attempt 1 is due and a sender is to make it.
SEND = "send"
#: A consumer that holds nothing and was not seen for this long belongs to a process that is gone.
FORGET_CONSUMERS_AFTER_MS = 3_600_000


def consumer_name() -> str:
    """Unique per process incarnation, like a worker name: a restarted container keeps its hostname."""
    return f"webhooks-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Decision:
    """What one event needs: ``outcome`` (``send``, ``already_scheduled`` or ``skipped``), and for a send
    the pending delivery and the job's or batch's record."""

    outcome: str
    delivery: dict[str, Any] | None = None
    record: JobRecord | BatchRecord | None = None


@dataclass
class OutboxDispatcher:
    """Reads the outbox as one consumer of its group and starts each event's first attempt."""

    redis: Redis  # a connection of its own: reads block for up to ``block``
    store: JobStore
    queue: Queue  # the webhook queue the attempts go on
    task_timeout: timedelta
    claim_idle: timedelta
    consumer: str = ""
    block: timedelta = timedelta(seconds=1)
    #: Makes first attempts itself and acknowledges their entries; None: attempt 1 goes on the queue.
    sender: FirstAttemptSender | None = None

    def __post_init__(self) -> None:
        self.consumer = self.consumer or consumer_name()
        self._next_claim = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acknowledged = 0  # guarded by ``_lock``
        self._lock = threading.Lock()

    # --- deciding ------------------------------------------------------------------------------------

    def decide(self, events: Sequence[OutboxEvent]) -> list[Decision]:
        """Record each event's delivery unless recorded, and say whether its attempt 1 is due — in two
        pipelined round trips for all of ``events``."""
        redis = self.store.redis
        with redis.pipeline(transaction=False) as pipe:
            for event in events:
                if event.subject == "job":
                    pipe.hgetall(job_key(event.id))
                    pipe.hgetall(webhooks_key(event.id))
                else:
                    pipe.hgetall(batch_key(event.id))
                    pipe.hgetall(batch_webhooks_key(event.id))
                pipe.exists(RQJob.key_for(task_job_id(event.msg_id, 1)))
            raw = pipe.execute()
        decisions: list[Decision] = []
        new: list[tuple[OutboxEvent, dict[str, Any], int]] = []
        for i, event in enumerate(events):
            stored, deliveries_raw, queued = raw[3 * i : 3 * i + 3]
            decision = self._decide_one(event, stored, decode_deliveries(deliveries_raw), bool(queued), new)
            decisions.append(decision)
        if new:
            with redis.pipeline(transaction=False) as pipe:
                for event, delivery, ttl_s in new:
                    key = webhooks_key(event.id) if event.subject == "job" else batch_webhooks_key(event.id)
                    pipe.hsetnx(key, event.msg_id, json.dumps(delivery, default=str))
                    pipe.expire(key, max(1, ttl_s))
                pipe.execute()
        return decisions

    def _decide_one(
        self,
        event: OutboxEvent,
        stored: Mapping[bytes, bytes],
        deliveries: list[dict[str, Any]],
        queued: bool,
        new: list[tuple[OutboxEvent, dict[str, Any], int]],
    ) -> Decision:
        bound = log.bind(msg_id=event.msg_id, webhook_event=event.type, **{f"{event.subject}_id": event.id})
        record: JobRecord | BatchRecord | None
        if event.subject == "job":
            record = JobRecord.from_stored(event.id, stored)
            ttl_s = self.store.retention_s
        else:
            record = BatchRecord.from_hash(event.id, stored) if stored else None
            ttl_s = record.retention_s if record is not None else 0
        if record is None or not record.webhook:
            bound.info("webhook.skipped", reason=f"{event.subject}_expired")
            return Decision("skipped")
        existing = next((d for d in deliveries if d.get("msg_id") == event.msg_id), None)
        if existing is None:
            if any(d.get("state") == "gone" for d in deliveries):
                # The receiver told us to stop (410) for an earlier event of this subject: respect it.
                bound.info("webhook.skipped", reason="receiver_gone")
                return Decision("skipped")
            existing = new_delivery(event.type, event.msg_id, event.at)
            new.append((event, existing, ttl_s))
        if existing.get("state") != "pending" or existing.get("attempts") or queued:
            return Decision("already_scheduled")  # its attempts are under way or over
        return Decision(SEND, existing, record)

    def handle(self, event: OutboxEvent) -> str:
        """Record the event's delivery and start its first attempt, each unless done already; returns
        what happened (``scheduled``: enqueued, ``send``: due and a sender is set, ``already_scheduled``,
        or ``skipped``). Without a sender, attempt 1 is enqueued here."""
        [decision] = self.decide([event])
        if decision.outcome != SEND or self.sender is not None:
            return decision.outcome
        task = WEBHOOK_TASK if event.subject == "job" else BATCH_WEBHOOK_TASK
        enqueue_attempt(self.queue, event.id, event.msg_id, 1, timeout=self.task_timeout, task=task)
        log.info("webhook.scheduled", msg_id=event.msg_id, **{f"{event.subject}_id": event.id})
        return "scheduled"

    # --- the loop ------------------------------------------------------------------------------------

    def acknowledge(self, entry_ids: Sequence[str]) -> None:
        """Acknowledge entries whose first attempt is enqueued (or that need none)."""
        outbox.acknowledge(self.store.redis, list(entry_ids))
        self.count_acknowledged(len(entry_ids))

    def count_acknowledged(self, count: int) -> None:
        """Count entries acknowledged here or by the sender (``drain`` reports them)."""
        with self._lock:
            self._acknowledged += count

    def _room(self) -> int:
        """Entries to read now: with a sender, as many attempts as may start (waited for up to
        ``block``) — what is not read stays the group's lag, the figure KEDA scales this process on."""
        if self.sender is None:
            return READ_COUNT
        return min(READ_COUNT, self.sender.room(self.block.total_seconds()))

    def run_once(self) -> int:
        """Claim what dead consumers left (at most every ``claim_idle / 2``), then read new entries
        (blocking up to ``block``) and handle them. Returns how many were read and handled: acknowledged,
        or handed to the sender, which acknowledges each once its attempt is recorded."""
        room = self._room()
        if room == 0 or self._stop.is_set():
            return 0
        entries: list[outbox.Entry] = []
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
        if not entries:
            return 0
        done: list[str] = []
        readable: list[tuple[str, OutboxEvent]] = []
        for entry_id, event in entries:
            if event is None:
                log.warning("outbox.unreadable_entry_dropped", entry_id=entry_id)
                done.append(entry_id)
            else:
                readable.append((entry_id, event))
        for (entry_id, event), decision in zip(readable, self._decide_each(readable), strict=True):
            if decision is None:
                continue  # left pending: retried after claim_idle
            if decision.outcome != SEND:
                done.append(entry_id)
            elif self.sender is None:
                task = WEBHOOK_TASK if event.subject == "job" else BATCH_WEBHOOK_TASK
                enqueue_attempt(self.queue, event.id, event.msg_id, 1, timeout=self.task_timeout, task=task)
                done.append(entry_id)
            else:
                self._hand_to_sender(entry_id, decision)
        if done:
            self.acknowledge(done)
        return len(done) if self.sender is None else len(entries)

    def _decide_each(self, entries: list[tuple[str, OutboxEvent]]) -> list[Decision | None]:
        """``decide`` for all entries at once; should that fail for anything but Redis (a corrupt record),
        one by one, so that only the bad entry is left pending (None) and logged."""
        events = [event for _, event in entries]
        try:
            return list(self.decide(events))
        except REDIS_UNAVAILABLE:
            raise
        except Exception:
            decisions: list[Decision | None] = []
            for entry_id, event in entries:
                try:
                    decisions.append(self.decide([event])[0])
                except REDIS_UNAVAILABLE:
                    raise
                except Exception:
                    log.exception("outbox.dispatch_failed", entry_id=entry_id, msg_id=event.msg_id)
                    decisions.append(None)
            return decisions

    def _hand_to_sender(self, entry_id: str, decision: Decision) -> None:
        sender = self.sender
        assert sender is not None and decision.delivery is not None
        record = decision.record
        subject = (
            job_subject(sender.ctx, record)
            if isinstance(record, JobRecord)
            else batch_subject(sender.ctx, cast(BatchRecord, record))
        )
        sender.submit(sender.build(entry_id, subject, decision.delivery))

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
        """Dispatch everything in the outbox now, without waiting for more (burst mode); how many entries
        were acknowledged (one whose handling failed stays pending and is not counted)."""
        outbox.ensure_group(self.redis)
        self._next_claim = 0.0
        block, self.block = self.block, timedelta(0)
        before = self._acknowledged
        try:
            while True:
                if self.sender is not None:
                    self.sender.wait_idle()  # attempts acknowledge their entries once recorded
                if not self.run_once():
                    return self._acknowledged - before
        finally:
            self.block = block

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, args=(self._stop.is_set,), name="outbox-dispatcher", daemon=True
        )
        self._thread.start()

    def stop(self, attempts_timeout_s: float = 60.0) -> None:
        """Stop after the current read (at most ``block``) and let the first attempts in flight end (each
        within the attempt deadline) and be recorded; then leave the group if nothing is pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.block.total_seconds() + 5)
        if self.sender is not None:
            self.sender.stop(attempts_timeout_s)
        try:
            outbox.leave(self.redis, self.consumer)
        except REDIS_UNAVAILABLE:
            pass
