"""The batch store: one Redis hash per batch, the list of its items beside it (keys: ``services.jobs.keys``).

A batch (``POST /v1/batches``) is a set of ordinary generation jobs, each carrying ``batch_id``. The API
admits the batch and all of its items in one script (``services.admission.BatchAdmitter``); from then on
the items live their own lives, and the batch hash only *counts* them: the lifecycle's transition script
increments ``done`` (and the per-status counter) when an item reaches a terminal status, and the
transition that ends the last item stamps ``completed_at`` and appends the batch's one ``batch.completed``
event to the outbox in the same step — whoever made it: worker, cancel or recovery.

Batch hash fields: owner, created_at, total, done, running, succeeded/failed/canceled, retention_s, webhook
(JSON), cancel_requested, completed_at, model. ``running`` (items running now) and the terminal counts let
a batch's counts be read from its hash alone (``GET /v1/batches`` lists a hundred batches in one round trip).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from redis import Redis
from redis.client import Pipeline

from services.jobs.keys import batch_key, batch_webhooks_key, items_key, job_key
from services.jobs.records import decode_deliveries, encode_fields

_REQUEST_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'completed_at') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
return 1
"""


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


_COUNTED = ("running", "succeeded", "failed", "canceled")


@dataclass
class BatchRecord:
    """A batch as stored. Item states are read from the items themselves; ``done`` counts ended ones."""

    id: str
    owner: str
    created_at: datetime
    total: int
    retention_s: int
    webhook: dict[str, Any] | None = None
    cancel_requested: bool = False
    completed_at: datetime | None = None
    done: int = 0
    model: str | None = None  # every item's model (one per batch); None only in pre-routing records
    #: Items per status as the lifecycle counts them in the hash (``running``: since shares existed).
    counted: dict[str, int] = field(default_factory=dict)

    def creation_fields(self) -> dict[str, str]:
        return encode_fields(
            {
                **({"model": self.model} if self.model else {}),
                "owner": self.owner,
                "created_at": self.created_at,
                "total": self.total,
                "done": 0,
                "retention_s": self.retention_s,
                **({"webhook": self.webhook} if self.webhook else {}),
            }
        )

    @classmethod
    def from_hash(cls, batch_id: str, raw: Mapping[bytes, bytes]) -> BatchRecord:
        data = {key.decode(): value.decode() for key, value in raw.items()}
        return cls(
            id=batch_id,
            owner=data.get("owner") or "anonymous",
            created_at=datetime.fromisoformat(data["created_at"]),
            total=int(data["total"]),
            retention_s=int(data.get("retention_s") or 1),
            webhook=json.loads(data["webhook"]) if data.get("webhook") else None,
            cancel_requested=data.get("cancel_requested") == "1",
            completed_at=datetime.fromisoformat(data["completed_at"]) if data.get("completed_at") else None,
            done=int(data.get("done") or 0),
            model=data.get("model") or None,
            counted={status: int(data.get(status) or 0) for status in _COUNTED},
        )


class BatchStore:
    """Sync reads and writes of batch records (cancel, webhook tasks); the API reads them async."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def get(self, batch_id: str) -> BatchRecord | None:
        raw = cast(Mapping[bytes, bytes], self.redis.hgetall(batch_key(batch_id)))
        return BatchRecord.from_hash(batch_id, raw) if raw else None

    def item_ids(self, batch_id: str) -> list[str]:
        return [raw.decode() for raw in cast(list[bytes], self.redis.lrange(items_key(batch_id), 0, -1))]

    def item_statuses(self, job_ids: list[str]) -> list[str | None]:
        return item_statuses_from(cast(list[bytes | None], _statuses(self.redis, job_ids)))

    def request_cancel(self, batch_id: str) -> bool:
        """Mark the batch canceled-on-request, unless it has already ended (False then): atomic with the
        transition that ends its last item, so a batch that completed is never relabelled canceled."""
        return bool(self.redis.eval(_REQUEST_CANCEL, 1, batch_key(batch_id)))

    def add_delivery(self, batch_id: str, msg_id: str, delivery: Mapping[str, Any], ttl_s: int) -> bool:
        """Record a new delivery unless one with this ``msg_id`` exists; True if this call added it."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(batch_webhooks_key(batch_id), msg_id, json.dumps(delivery, default=str))
            pipe.expire(batch_webhooks_key(batch_id), max(1, ttl_s))
            added, _ = pipe.execute()
        return bool(added)

    def put_delivery(
        self,
        batch_id: str,
        msg_id: str,
        delivery: Mapping[str, Any],
        ttl_s: int,
        *,
        pipe: Pipeline | None = None,
    ) -> None:
        """Save a delivery record; with ``pipe``, only add the commands to it (the caller executes)."""
        if pipe is not None:
            pipe.hset(batch_webhooks_key(batch_id), msg_id, json.dumps(delivery, default=str))
            pipe.expire(batch_webhooks_key(batch_id), max(1, ttl_s))
            return
        with self.redis.pipeline(transaction=False) as own:
            self.put_delivery(batch_id, msg_id, delivery, ttl_s, pipe=own)
            own.execute()

    def get_delivery(self, batch_id: str, msg_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(batch_webhooks_key(batch_id), msg_id)
        return json.loads(cast(bytes, raw)) if raw else None

    def deliveries(self, batch_id: str) -> list[dict[str, Any]]:
        return decode_deliveries(
            cast(Mapping[bytes, bytes], self.redis.hgetall(batch_webhooks_key(batch_id)))
        )


def _statuses(redis: Redis, job_ids: list[str]) -> list[Any]:
    with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(job_key(job_id), "status")
        return pipe.execute()


def item_statuses_from(raw: list[bytes | None]) -> list[str | None]:
    return [value.decode() if value else None for value in raw]
