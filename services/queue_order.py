"""A queued job's place in line and how soon a poller should look again, in O(1) whatever the queue's depth.

Reading a queued job used to cost an ``LPOS`` over the queue list: O(position), ~10 ms of Redis CPU at the
back of a 100,000-deep queue, on every poll (issue #17). Now each RQ queue keeps a small hash of counters
(``services.jobs.keys.queue_order_key``):

- ``pushed``: admission gives each job it pushes the next number (``queue_seq`` on the job hash; a batch
  takes ``n`` numbers at once, its items in order);
- ``claimed``: the claim (``Lifecycle.claim``) raises it to the claimed job's number if higher;
- ``gap_ms``: an EWMA of the time between two claims on that queue (Redis's clock; one gap counts at most
  a minute, so an idle night does not poison the morning), from which a wait is estimated.

A queued job's position is ``max(1, queue_seq - claimed)`` (1 = next to run), one ``HMGET``. It is exact
while jobs leave the queue in order and nothing ahead is canceled. Otherwise it is an estimate, and which
way it errs is known:

- a job **canceled** (or failed as unserved) while ahead of you still counts until a job behind it is
  claimed: the position is then *too high*;
- a lost job **requeued** at the front is given the queue's ``claimed`` number (position 1) and is not
  counted by the jobs behind it: their position is *too low* by the number of such jobs ahead;
- a job claimed **out of order** (coalesced with an identical earlier one, ``worker.coalescing``) raises
  ``claimed`` past jobs still waiting: theirs is too low, and never below 1.

Records admitted before the counters existed have no ``queue_seq``: their position comes from ``LPOS``
once per read, as before (``rq_records.queue_position_async``), until they drain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import cast

import redis.asyncio as aredis

from schemas.jobs import Job, JobStatus
from services.jobs.records import utcnow

#: Bounds of the ``Retry-After`` hint on a queued job: poll at least every 30 s, at most every second.
MIN_POLL_S, MAX_POLL_S = 1, 30
#: Bounds for a running job: a poller wants its progress too, so never more than a few seconds.
MAX_RUNNING_POLL_S = 5
#: Hint when nothing better is known (no claim seen yet on the queue, no progress on a running job).
DEFAULT_POLL_S = 2


@dataclass(frozen=True)
class QueueOrder:
    """A queue's counters as read: the highest claimed sequence number, the claim-gap EWMA (ms)."""

    claimed: int = 0
    gap_ms: float | None = None

    def position(self, queue_seq: int) -> int:
        """The place in line of the job numbered ``queue_seq`` (1 = next to run)."""
        return max(1, queue_seq - self.claimed)


async def read_order_async(redis: aredis.Redis, order_key: str) -> QueueOrder:
    """The counters of one queue, in one ``HMGET``."""
    claimed, gap = cast(list[bytes | None], await redis.hmget(order_key, ["claimed", "gap_ms"]))
    return QueueOrder(int(claimed) if claimed else 0, float(gap) if gap else None)


def _clamp(seconds: float, low: int, high: int) -> int:
    return max(low, min(high, math.ceil(seconds)))


def queued_retry_after(position: int, gap_ms: float | None) -> int:
    """Seconds until a queued job at ``position`` is likely to have started: ``position`` claims at the
    queue's recent pace, within ``MIN_POLL_S..MAX_POLL_S``."""
    if gap_ms is None:
        return DEFAULT_POLL_S
    return _clamp(position * gap_ms / 1000, MIN_POLL_S, MAX_POLL_S)


def running_retry_after(job: Job, now: datetime | None = None) -> int:
    """Seconds until a running job is likely to have moved on: its remaining steps at the pace of the steps
    done so far, within ``MIN_POLL_S..MAX_RUNNING_POLL_S``."""
    progress = job.progress
    if progress is None or progress.step <= 0 or job.started_at is None:
        return DEFAULT_POLL_S
    elapsed = ((now or utcnow()) - job.started_at).total_seconds()
    remaining = max(0, progress.total - progress.step) * elapsed / progress.step
    return _clamp(remaining, MIN_POLL_S, MAX_RUNNING_POLL_S)


def retry_after(job: Job, gap_ms: float | None) -> int | None:
    """The ``Retry-After`` hint for a read of ``job`` (None once it has ended: nothing left to wait for)."""
    if job.status is JobStatus.QUEUED:
        return queued_retry_after(job.queue_position or 1, gap_ms)
    if job.status is JobStatus.RUNNING:
        return running_retry_after(job)
    return None


def header(seconds: int | None) -> dict[str, str]:
    """``{"Retry-After": ...}``, or nothing."""
    return {} if seconds is None else {"Retry-After": str(seconds)}
