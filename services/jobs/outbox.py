"""The outbox: a Redis stream of the webhook events that status changes caused, and how it is consumed.

The lifecycle's transition scripts append to it in the same atomic step as the change itself, so an
event exists exactly when its change does. The webhook process reads it as the consumer group
``darkroom:outbox:dispatch`` (``services.webhooks.dispatcher``): each entry is turned into a delivery
record and a first delivery attempt, and only then acknowledged and deleted. An entry a consumer read but
never acknowledged (it died) stays pending in the group; after ``claim_idle`` any live consumer claims it
(``XAUTOCLAIM``) and finishes the job, so deliveries are at-least-once and keep their ``msg_id`` (the
Standard Webhooks ``webhook-id`` receivers deduplicate on).

Entry fields: ``msg_id``, ``type`` (``generation.started|progress|succeeded|failed|canceled``,
``batch.completed``), ``subject`` (``job`` or ``batch``), ``id`` (the job's or batch's id), ``at`` (when
it happened, ISO 8601: the payload's ``timestamp``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import ResponseError

from services.jobs.keys import OUTBOX, OUTBOX_GROUP

Subject = Literal["job", "batch"]


def new_msg_id() -> str:
    """A fresh message id in the Standard Webhooks ``msg_...`` style."""
    return f"msg_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class OutboxEvent:
    """One event waiting for delivery, as the transition wrote it."""

    msg_id: str
    type: str
    subject: Subject
    id: str
    at: str

    @classmethod
    def from_entry(cls, fields: Mapping[bytes, bytes]) -> OutboxEvent:
        """Decode a stream entry; ``ValueError`` for one that is not an outbox event."""
        data = {key.decode(): value.decode() for key, value in fields.items()}
        try:
            subject = data["subject"]
            if subject not in ("job", "batch"):
                raise ValueError(f"unknown outbox subject {subject!r}")
            return cls(
                msg_id=data["msg_id"],
                type=data["type"],
                subject=cast(Subject, subject),
                id=data["id"],
                at=data["at"],
            )
        except KeyError as missing:
            raise ValueError(f"outbox entry without {missing}") from None


Entry = tuple[str, OutboxEvent | None]  # stream id, event (None: unreadable, or deleted while pending)


def ensure_group(redis: Redis) -> None:
    """Create the stream and its consumer group if missing, reading from the stream's beginning: events
    appended before any webhook process ever ran are delivered too."""
    try:
        redis.xgroup_create(OUTBOX, OUTBOX_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _entries(raw: Sequence[Any]) -> list[Entry]:
    decoded: list[Entry] = []
    for entry_id, fields in raw:
        key = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        if not fields:  # deleted from the stream while still pending
            decoded.append((key, None))
            continue
        try:
            decoded.append((key, OutboxEvent.from_entry(fields)))
        except ValueError:
            decoded.append((key, None))
    return decoded


def read_new(redis: Redis, consumer: str, *, count: int, block_ms: int | None) -> list[Entry]:
    """Entries no consumer of the group has read yet, now pending under ``consumer``."""
    reply = cast(
        list[Any],
        redis.xreadgroup(OUTBOX_GROUP, consumer, {OUTBOX: ">"}, count=count, block=block_ms),
    )
    return _entries(reply[0][1]) if reply else []


def claim_stale(redis: Redis, consumer: str, *, min_idle_ms: int, count: int) -> list[Entry]:
    """Entries another consumer read but left unacknowledged for ``min_idle_ms`` (it died, or hangs):
    now ``consumer``'s."""
    reply = redis.xautoclaim(
        OUTBOX, OUTBOX_GROUP, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
    )
    return _entries(reply[1]) if len(reply) > 1 else []


def acknowledge(redis: Redis, entry_ids: Sequence[str]) -> None:
    """Done with these entries: out of the pending list and out of the stream, in one step."""
    if not entry_ids:
        return
    with redis.pipeline(transaction=True) as pipe:
        stage_acknowledge(pipe, entry_ids)
        pipe.execute()


def stage_acknowledge(pipe: Pipeline, entry_ids: Sequence[str]) -> None:
    """``acknowledge`` as commands added to a transaction the caller executes (with what it records)."""
    pipe.xack(OUTBOX, OUTBOX_GROUP, *entry_ids)
    pipe.xdel(OUTBOX, *entry_ids)


def backlog(redis: Redis) -> int:
    """Events waiting for dispatch: the stream holds only entries not yet acknowledged (an acknowledged
    one is deleted), read or not."""
    return int(redis.xlen(OUTBOX))


def leave(redis: Redis, consumer: str) -> bool:
    """Remove ``consumer`` from the group if nothing is pending under it (a clean stop); True if removed.
    With entries pending it stays, so that they can be claimed."""
    pending = redis.xpending_range(OUTBOX, OUTBOX_GROUP, min="-", max="+", count=1, consumername=consumer)
    if pending:
        return False
    redis.xgroup_delconsumer(OUTBOX, OUTBOX_GROUP, consumer)
    return True


def forget_idle_consumers(redis: Redis, *, idle_ms: int) -> int:
    """Remove consumers that hold nothing and were not seen for ``idle_ms`` (processes that died after
    their entries were claimed); how many. Consumer names are per process, so they would pile up."""
    gone = 0
    for info in redis.xinfo_consumers(OUTBOX, OUTBOX_GROUP):
        if int(info.get("pending", 0)) == 0 and int(info.get("idle", 0)) >= idle_ms:
            name = info["name"]
            redis.xgroup_delconsumer(OUTBOX, OUTBOX_GROUP, name.decode() if isinstance(name, bytes) else name)
            gone += 1
    return gone
