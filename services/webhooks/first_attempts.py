"""First attempts of new webhook events, sent from one event loop: the webhook process's fast path.

Nearly every delivery is a first attempt, and nearly all of an attempt's time is spent waiting for the
receiver. Threads made that wait cheap to write and expensive to run: with hundreds of them, one process
spent most of its CPU handing the interpreter lock and redis-py's pool lock around, and topped out near
200 deliveries a second against receivers answering in 150 ms (``bench/webhook_rate.py``). Here the
waiting happens in one asyncio loop (``attempt_delivery_async``), and the Redis work around it stays
synchronous, in two threads that batch it: the outbox dispatcher reads and prepares many events per round
trip (``services.webhooks.dispatcher``), and this module's *concluder* records finished attempts and
acknowledges their outbox entries.

Guarantees kept from the per-attempt RQ task this replaces for first attempts:

- **Shares**: an attempt takes its API key's and its receiver host's share (``services.webhooks.hosts``,
  the same counters the retry threads use). When one is full the attempt waits for it *in the loop*,
  holding no thread, for at most ``share_wait_s`` and behind at most ``WAITERS_PER_SLOT`` waiters per
  slot of that share; past either it is parked behind the share (``services.webhooks.parking``), as a
  retry would be. So a burst to one healthy receiver is sent back to back, while a hanging receiver's
  backlog costs a bounded number of waiting attempts and the rest of its events leave the process.
- **Deadline**: each exchange ends within ``DARKROOM_WEBHOOK_ATTEMPT_DEADLINE``.
- **Crash record**: an attempt's outbox entry is acknowledged only once the attempt is recorded on the
  delivery (or parked). If the process dies in between, another claims the entry after
  ``DARKROOM_OUTBOX_CLAIM_IDLE`` and sends again with the same ``webhook-id``; ``share_wait_s`` is kept
  small enough that a waiting attempt is never claimed from under a live process.
- **Our errors**: an attempt that cannot be built (no signing secret, a bug rendering the payload) fails
  its delivery with a "not sent" entry, as the RQ task does; an error recording an attempt (Redis gone
  past its retry deadline) leaves the entry pending, to be claimed and redone.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import structlog

from services.clients import retry_while_redis_down
from services.jobs import outbox
from services.webhooks.delivery import AttemptResult, WebhookMessage, attempt_delivery_async
from services.webhooks.hosts import HostLimiter
from services.webhooks.one_shot import OneShotTransport
from services.webhooks.tasks import (
    DeliveryContext,
    Settled,
    Subject,
    follow_up,
    put_back_for_share,
    record_not_sent,
    settle_attempt,
    shares,
    usable_secret,
)

log = structlog.get_logger(__name__)

#: Attempts that may wait in the loop for one busy share, per slot of that share; more are parked behind
#: the share at once. Enough for a burst to a healthy receiver to go out back to back.
WAITERS_PER_SLOT = 8
#: How often a waiting attempt looks again for a slot freed by a retry thread (which cannot wake it).
RECHECK_S = 0.25
#: Finished attempts the concluder records per batch at most.
CONCLUDE_BATCH = 100


def share_wait_s(claim_idle: timedelta, attempt_deadline: timedelta) -> float:
    """How long a first attempt may wait in the loop for a busy share: at most 5 s, and short enough that
    waiting plus the attempt itself stays well inside ``claim_idle`` (else another process could claim
    the entry and send it too)."""
    spare = (claim_idle - attempt_deadline).total_seconds() / 2
    return max(0.0, min(5.0, spare))


@dataclass
class FirstAttempt:
    """One outbox entry's first attempt: what to send and where the outcome is recorded."""

    entry_id: str
    subject: Subject
    delivery: dict[str, Any]  # the pending delivery record, as stored
    message: WebhookMessage | None = None  # None: could not be built (``error`` says why)
    error: BaseException | None = None
    bound: Any = field(default=None, repr=False)


class _ShareWaits:
    """Attempts in the loop waiting for a slot of a busy share (a host or an API key), woken one at a
    time as the loop's own attempts release slots."""

    def __init__(self) -> None:
        self._waiters: dict[str, deque[asyncio.Future[None]]] = defaultdict(deque)

    def waiting(self, name: str) -> int:
        return len(self._waiters.get(name, ()))

    async def wait(self, name: str, timeout: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters[name]
        waiters.append(future)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(name, None)

    def wake(self, name: str) -> None:
        waiters = self._waiters.get(name)
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                return


class FirstAttemptSender:
    """Sends first attempts on an event loop thread; records and acknowledges them from a concluder thread.

    An attempt's outbox entry is acknowledged in the transaction that records it; ``on_acknowledged`` is
    told how many were (in the concluder thread). ``concurrency`` bounds attempts in flight, waiting ones
    included (``room``).
    """

    def __init__(
        self,
        ctx: DeliveryContext,
        *,
        on_acknowledged: Callable[[int], None] = lambda count: None,
        concurrency: int,
        share_wait_s: float,
        timeout_s: float,
        redis_retry_deadline_s: float,
        transport_factory: Callable[[], httpx.AsyncBaseTransport] = OneShotTransport,
    ) -> None:
        self.ctx = ctx
        self.concurrency = concurrency
        self.share_wait_s = share_wait_s
        self._on_acknowledged = on_acknowledged
        self._timeout = httpx.Timeout(timeout_s)
        self._transport_factory = transport_factory
        self._redis_retry_deadline_s = redis_retry_deadline_s
        self._in_flight = 0  # submitted, not yet concluded; guarded by ``_slots``
        self._slots = threading.Condition()
        self._done: queue.Queue[tuple[str, FirstAttempt, Any] | None] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._waits = _ShareWaits()
        self._transport: httpx.AsyncBaseTransport | None = None
        self._loop_thread = threading.Thread(target=self._run_loop, name="webhook-loop", daemon=True)
        self._concluder = threading.Thread(
            target=self._conclude_forever, name="webhook-concluder", daemon=True
        )
        self._stopping = threading.Event()
        self._loop_thread.start()
        self._concluder.start()

    # --- the dispatcher's side -----------------------------------------------------------------------

    def room(self, timeout: float) -> int:
        """Attempts that may start now, waiting up to ``timeout`` for one to end if none may."""
        with self._slots:
            self._slots.wait_for(lambda: self._in_flight < self.concurrency, timeout)
            return max(0, self.concurrency - self._in_flight)

    def build(self, entry_id: str, subject: Subject, delivery: dict[str, Any]) -> FirstAttempt:
        """The attempt for ``delivery``: its payload rendered and checked now, in the caller's thread."""
        attempt = FirstAttempt(entry_id=entry_id, subject=subject, delivery=delivery)
        attempt.bound = log.bind(msg_id=delivery["msg_id"], subject_id=subject.id, attempt=1)
        try:
            usable_secret(self.ctx.secret)
            payload = subject.payload(delivery["event"], delivery["created_at"])
        except Exception as exc:  # our fault: recorded as "not sent" by the concluder
            attempt.error = exc
            return attempt
        attempt.message = WebhookMessage(
            url=subject.url, event_type=delivery["event"], payload=payload, msg_id=delivery["msg_id"]
        )
        return attempt

    def submit(self, attempt: FirstAttempt) -> None:
        """Start ``attempt`` (thread-safe); its entry is acknowledged once the attempt is recorded."""
        with self._slots:
            self._in_flight += 1
        if attempt.message is None:
            self._done.put(("not_sent", attempt, attempt.error))
            return
        self._loop.call_soon_threadsafe(self._start, attempt)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no attempt is in flight or waiting to be recorded; whether that happened in time."""
        with self._slots:
            return self._slots.wait_for(lambda: self._in_flight == 0, timeout)

    def stop(self, timeout: float) -> None:
        """Let the attempts in flight end (each within the deadline) and be recorded, then stop."""
        self.wait_idle(timeout)
        self._stopping.set()
        self._done.put(None)
        self._concluder.join(timeout=10)
        if self._transport is not None:
            transport = self._transport
            asyncio.run_coroutine_threadsafe(transport.aclose(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)

    # --- the loop ------------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._transport = self._transport_factory()
        self._loop.run_forever()
        self._loop.close()

    def _start(self, attempt: FirstAttempt) -> None:
        self._loop.create_task(self._send(attempt))

    async def _send(self, attempt: FirstAttempt) -> None:
        try:
            held = await self._take_shares(attempt.subject)
            if isinstance(held, tuple):  # the share named stayed busy: parked
                self._done.put(("busy", attempt, held))
                return
            try:
                assert attempt.message is not None and self._transport is not None
                result = await attempt_delivery_async(
                    self._transport,
                    attempt.message,
                    usable_secret(self.ctx.secret),
                    1,
                    allow_private=self.ctx.allow_private,
                    allow_http=self.ctx.allow_http,
                    timeout=self._timeout,
                    clock=self.ctx.clock,
                    resolver=self.ctx.resolver,
                    deadline_s=self.ctx.deadline_s,
                )
            finally:
                for limiter, name in held:
                    limiter.release(name)
                    self._waits.wake(name)
            self._done.put(("sent", attempt, result))
        except Exception as exc:  # a bug of ours: logged, the entry left to be claimed and redone
            self._done.put(("error", attempt, exc))

    async def _take_shares(self, subject: Subject) -> list[tuple[HostLimiter, str]] | tuple[str, str]:
        """Both shares held (key, then host), or (scope, name) of the one that stayed busy."""
        ends = self._loop.time() + self.share_wait_s
        while True:
            held: list[tuple[HostLimiter, str]] = []
            busy: tuple[HostLimiter, str, str] | None = None
            for limiter, name, scope in shares(self.ctx, subject):
                if not limiter.try_acquire(name):
                    busy = (limiter, name, scope)
                    break
                held.append((limiter, name))
            if busy is None:
                return held
            for limiter, name in held:
                limiter.release(name)
                self._waits.wake(name)
            limiter, name, scope = busy
            left = ends - self._loop.time()
            if left <= 0 or self._waits.waiting(name) >= WAITERS_PER_SLOT * limiter.per_host:
                return scope, name
            await self._waits.wait(name, min(RECHECK_S, left))

    # --- the concluder -------------------------------------------------------------------------------

    def _conclude_forever(self) -> None:
        while True:
            first = self._done.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < CONCLUDE_BATCH:
                try:
                    item = self._done.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._done.put(None)  # seen after this batch
                    break
                batch.append(item)
            self._conclude(batch)

    def _conclude(self, batch: list[tuple[str, FirstAttempt, Any]]) -> None:
        """Record a batch of finished attempts: each sent one's delivery saved and its outbox entry
        acknowledged in one pipelined round trip for the whole batch; the rare others one by one."""
        sent: list[tuple[FirstAttempt, AttemptResult, Settled]] = []
        acknowledged: list[str] = []
        try:
            for kind, attempt, detail in batch:
                if kind == "sent":
                    result: AttemptResult = detail
                    settled = settle_attempt(self.ctx, attempt.delivery, 1, result.record, result.outcome)
                    sent.append((attempt, result, settled))
                elif kind == "error":  # a bug of ours: nothing recorded, the entry left to be claimed
                    attempt.bound.error("webhook.attempt_error", exc_info=detail)
                elif self._redis_retrying(functools.partial(self._record_other, kind, attempt, detail)):
                    acknowledged.append(attempt.entry_id)
            if self._redis_retrying(functools.partial(self._save_sent, sent, acknowledged)):
                for attempt, result, settled in sent:
                    self._follow_up(attempt, result, settled)
        finally:
            with self._slots:
                self._in_flight -= len(batch)
                self._slots.notify_all()

    def _redis_retrying(self, operation: Callable[[], None]) -> bool:
        """Run ``operation`` through a Redis blip; False (logged) if it failed: its entries stay pending,
        to be claimed and redone."""
        try:
            retry_while_redis_down(
                operation,
                what="webhook first attempts",
                deadline_s=self._redis_retry_deadline_s,
                should_stop=self._stopping.is_set,
            )
        except Exception:
            log.exception("webhook.attempts_not_recorded")
            return False
        return True

    def _save_sent(
        self, sent: list[tuple[FirstAttempt, AttemptResult, Settled]], acknowledged: list[str]
    ) -> None:
        # One transaction: a delivery saved is never left with its entry pending, nor the reverse.
        with self.ctx.store.redis.pipeline(transaction=True) as pipe:
            for attempt, _, _ in sent:
                attempt.subject.stage(pipe, attempt.delivery["msg_id"], attempt.delivery)
            entry_ids = [*acknowledged, *(attempt.entry_id for attempt, _, _ in sent)]
            if entry_ids:
                outbox.stage_acknowledge(pipe, entry_ids)
            pipe.execute()
        self._on_acknowledged(len(entry_ids))

    def _follow_up(self, attempt: FirstAttempt, result: AttemptResult, settled: Settled) -> None:
        try:
            retry_while_redis_down(
                lambda: follow_up(
                    self.ctx, attempt.subject, attempt.delivery, 1, result.record, settled, attempt.bound
                ),
                what="webhook retry scheduling",
                deadline_s=self._redis_retry_deadline_s,
                should_stop=self._stopping.is_set,
            )
        except Exception:  # recorded as pending with no retry queued: logged for an operator
            attempt.bound.exception("webhook.retry_not_scheduled")

    def _record_other(self, kind: str, attempt: FirstAttempt, detail: Any) -> None:
        ctx, subject, delivery, bound = self.ctx, attempt.subject, attempt.delivery, attempt.bound
        if kind == "busy":
            scope, name = detail
            put_back_for_share(ctx, subject, delivery["msg_id"], 1, 0, scope, name, bound)
        else:  # not_sent
            bound.error("webhook.not_sent", event_type=delivery["event"], exc_info=detail)
            record_not_sent(ctx, subject, delivery, 1, detail)
