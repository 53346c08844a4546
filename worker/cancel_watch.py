"""Cancel requests pushed to the worker, so the denoising loop never asks Redis between steps.

A running job stops at its next denoising step once a cancel is requested (docs/api). Asking Redis at every
step (``HGET cancel_requested``) cost one command per step per job — 40+ per SD3.5 job, most of a
worker's Redis traffic. Instead the lifecycle, after marking a running job, publishes its id on the
channel of the worker that holds it (``Lifecycle.request_cancel``, ``keys.cancel_channel``), and this
worker reads its subscription between steps: a non-blocking look at a socket, no command sent.

Nothing is missed:
- a request made before the claim (the job was still ``queued``): the claim reads the flag in the same
  script (``Lifecycle.claim`` replies with the record) and hands it to :meth:`CancelWatch.watch`, so the
  watch reads nothing itself (it used to read the flag after the claim: a round trip per job, issue #17);
- a request made just after the claim, before :meth:`~CancelWatch.watch` (its message may be drained
  meanwhile, by a check of another job): the worker calls :meth:`~CancelWatch.expect` before it claims,
  and a message for a job expected is kept like one for a job watched;
- a request while the subscription was down (Redis restarted, the connection dropped): redis-py
  re-subscribes on reconnect, and every confirmation of a subscription (the first one included) makes
  the watch re-read the flag of each job it watches — any flag set before Redis confirmed is read then,
  any later one is published to us;
- a subscription that died without a sign: the flag is also re-read every ``fallback_s`` (default 5 s,
  about one command per SD3.5 job).
While Redis cannot be asked the answer is "keep going", as before.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
import structlog

from services.clients import REDIS_UNAVAILABLE
from services.jobs import Lifecycle
from services.jobs.keys import cancel_channel

log = structlog.get_logger(__name__)
SUBSCRIBE_WAIT_S = 5.0


class CancelWatch:
    """One worker's subscription to its cancel channel; which of its jobs were asked to stop."""

    def __init__(
        self, connection: redis.Redis, lifecycle: Lifecycle, worker_name: str, *, fallback_s: float = 5.0
    ) -> None:
        self.lifecycle = lifecycle
        self.channel = cancel_channel(worker_name)
        self.fallback_s = fallback_s
        self._pubsub = connection.pubsub()
        self._lock = threading.Lock()
        self._watched: dict[str, float] = {}  # job id -> when its flag was last read (monotonic)
        self._requested: set[str] = set()

    def start(self) -> None:
        """Subscribe, and wait until Redis confirms: from then on, every request reaches us."""
        self._pubsub.subscribe(self.channel)
        deadline = time.monotonic() + SUBSCRIBE_WAIT_S
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=0.5)
            if message is not None and message["type"] == "subscribe":
                return
        raise redis.exceptions.TimeoutError(f"redis did not confirm the subscription to {self.channel}")

    def close(self) -> None:
        try:
            self._pubsub.close()
        except REDIS_UNAVAILABLE:
            pass

    def expect(self, job_id: str) -> None:
        """Before claiming ``job_id``: a request published for it is kept from now on (the lifecycle
        publishes to us as soon as the claim made it ours, which may be before :meth:`watch`). Its flag is
        not read (the claim reads it; after a resubscription it is). :meth:`forget` it if the claim does
        not apply."""
        with self._lock:
            self._watched.setdefault(job_id, float("inf"))  # never due until watched, or resubscribed

    def watch(self, job_id: str, cancel_requested: bool | None = None) -> None:
        """Watch a job this worker has just claimed. ``cancel_requested``: its flag as the claim read it
        (``Transition.record``: a request made while it was queued is not published), so nothing is read
        now and the periodic read is due ``fallback_s`` later. None: the flag is not known, read it once
        here (Redis away: at the next reconnect instead)."""
        if cancel_requested is None:
            with self._lock:
                self._watched[job_id] = float("-inf")
            self.requested(job_id)
            return
        now = time.monotonic()
        with self._lock:
            # A resubscription since expect() made the flag due (-inf): what was published meanwhile is
            # lost, and the claim's read may predate it. That read stays due.
            self._watched[job_id] = min(self._watched.get(job_id, now), now)
            if cancel_requested:
                self._requested.add(job_id)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._watched.pop(job_id, None)
            self._requested.discard(job_id)

    def requested(self, job_id: str) -> bool:
        """Whether ``job_id`` was asked to stop: what the subscription brought, plus a read of the flag
        when it is due. Never raises for a Redis outage (the answer is then "not yet")."""
        try:
            self._drain()
            self._read_due(job_id)
        except REDIS_UNAVAILABLE as exc:
            log.debug("cancel watch: redis unavailable", error=str(exc))
        with self._lock:
            return job_id in self._requested

    def _drain(self) -> None:
        """Every message already on the socket; a (re)subscription makes every watched flag due."""
        while True:
            message: dict[str, Any] | None = self._pubsub.get_message(timeout=0.0)
            if message is None:
                return
            kind, data = message["type"], message["data"]
            with self._lock:
                if kind == "message":
                    job_id = data.decode() if isinstance(data, bytes) else str(data)
                    if job_id in self._watched:  # watched or expected; any other is no job of ours now
                        self._requested.add(job_id)
                elif kind == "subscribe":  # (re)connected: what was published meanwhile is lost
                    for watched in self._watched:
                        self._watched[watched] = float("-inf")

    def _read_due(self, job_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._watched.get(job_id)
            due = [watched for watched, at in self._watched.items() if now - at >= self.fallback_s]
        if last is None or not due:
            return
        for watched in due:
            if self.lifecycle.cancel_requested(watched):
                with self._lock:
                    if watched in self._watched:
                        self._requested.add(watched)
            with self._lock:
                if watched in self._watched:
                    self._watched[watched] = now
