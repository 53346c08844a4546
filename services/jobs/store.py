"""Reading jobs, and the webhook delivery records kept beside them. No status is written here: every status
change goes through ``services.jobs.lifecycle``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, cast

from redis import Redis
from redis.client import Pipeline

from services.jobs.keys import JOB_PREFIX, RUNNING_SET, events_key, job_key, webhooks_key
from services.jobs.records import JobRecord, decode_deliveries, decode_event


class JobStore:
    """Sync reads of job records and their event streams (worker, webhook process, recovery), and the
    delivery records the webhook process keeps. Thread-safe (redis-py pools connections)."""

    def __init__(self, redis: Redis, retention: timedelta) -> None:
        self.redis = redis
        self.retention_s = max(1, int(retention.total_seconds()))

    def get(self, job_id: str) -> JobRecord | None:
        raw = cast(Mapping[bytes, bytes], self.redis.hgetall(job_key(job_id)))
        return JobRecord.from_stored(job_id, raw)

    def running_job_ids(self) -> list[str]:
        """Every running job's id (O(running): for tests and tools; recovery reads only the stale end)."""
        members = cast(list[bytes], self.redis.zrange(RUNNING_SET, 0, -1))
        return sorted(member.decode().removeprefix(JOB_PREFIX) for member in members)

    def forget_running(self, job_id: str) -> None:
        """Drop an expired job from the running set (its record is gone: nothing left to recover)."""
        self.redis.zrem(RUNNING_SET, job_key(job_id))

    def events_since(
        self, job_id: str, last_id: str = "0-0", count: int = 500
    ) -> list[tuple[str, dict[str, Any]]]:
        entries = cast(list[Any], self.redis.xrange(events_key(job_id), min=f"({last_id}", count=count))
        return [(entry_id.decode(), decode_event(values)) for entry_id, values in entries]

    # --- webhook delivery records ------------------------------------------------------------------------

    def add_delivery(self, job_id: str, msg_id: str, delivery: Mapping[str, Any]) -> bool:
        """Record a new delivery unless one with this ``msg_id`` exists; True if this call added it."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(webhooks_key(job_id), msg_id, json.dumps(delivery, default=str))
            pipe.expire(webhooks_key(job_id), self.retention_s)
            added, _ = pipe.execute()
        return bool(added)

    def put_delivery(
        self, job_id: str, msg_id: str, delivery: Mapping[str, Any], *, pipe: Pipeline | None = None
    ) -> None:
        """Save a delivery record; with ``pipe``, only add the commands to it (the caller executes)."""
        if pipe is not None:
            pipe.hset(webhooks_key(job_id), msg_id, json.dumps(delivery, default=str))
            pipe.expire(webhooks_key(job_id), self.retention_s)
            return
        with self.redis.pipeline(transaction=False) as own:
            self.put_delivery(job_id, msg_id, delivery, pipe=own)
            own.execute()

    def get_delivery(self, job_id: str, msg_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(webhooks_key(job_id), msg_id)
        return json.loads(cast(bytes, raw)) if raw else None

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        return decode_deliveries(cast(Mapping[bytes, bytes], self.redis.hgetall(webhooks_key(job_id))))
