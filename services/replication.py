"""Waiting for a replica's acknowledgement (Redis ``WAIT``) after the writes a client is told about.

Why: Redis replicates asynchronously. A primary that acknowledged a submission and then died before its
replica received it takes the job with it, and the replica Sentinel promotes never heard of it — yet the
client holds a 202. With ``DARKROOM_REDIS_MIN_REPLICA_ACKS=n`` the writes we acknowledge to someone (an
admission's 202, a job's end) are followed by ``WAIT n timeout``, which returns once ``n`` replicas have
everything this connection wrote. Only then is the write acknowledged: it is on the primary and on ``n``
replicas, and a failover to one of them keeps it.

``WAIT`` counts what *its own connection* wrote, so the script and the ``WAIT`` travel in one pipeline
(one connection, one round trip).
A ``WAIT`` that times out does not undo the write (Redis has no such thing): it is on the primary only.
:class:`NotReplicated` says so; callers decide (the API answers 503 ``redis_unavailable`` and an
``Idempotency-Key`` replay returns the same job; a worker logs and goes on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis
import redis.exceptions
from redis import Redis
from redis.commands.core import AsyncScript, Script

from services.settings import Settings

#: What redis-py's ``Script`` takes as keys, and as arguments.
ScriptKeys = Sequence[str | bytes]
ScriptArgs = Sequence[str | bytes | int | float]


class NotReplicated(redis.exceptions.TimeoutError):
    """The write is on the primary but fewer replicas than required acknowledged it in time.

    A ``TimeoutError``: "Redis cannot promise this right now", handled wherever an unreachable Redis is
    (the API's 503 ``redis_unavailable``; ``REDIS_UNAVAILABLE`` in the workers)."""

    def __init__(self, required: int, acknowledged: int, result: Any = None) -> None:
        super().__init__(f"{acknowledged} of {required} required replica(s) acknowledged the write in time")
        self.required = required
        self.acknowledged = acknowledged
        #: What the script answered (it ran, on the primary).
        self.result = result


@dataclass(frozen=True)
class ReplicaAcks:
    """How many replicas must acknowledge, and for how long to wait for them."""

    replicas: int = 0
    timeout_ms: int = 1000

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplicaAcks:
        timeout_ms = max(1, int(settings.redis_replica_ack_timeout.total_seconds() * 1000))
        return cls(settings.redis_min_replica_acks, timeout_ms)


NO_ACKS = ReplicaAcks()
#: Written (and expiring) by :func:`wait_for_replicas_async`, only so that its ``WAIT`` has a write to count.
PROBE_KEY = "darkroom:replication:probe"


def run_replicated(
    script: Script, keys: ScriptKeys, args: ScriptArgs, client: Redis, acks: ReplicaAcks = NO_ACKS
) -> Any:
    """``script(keys, args)``, then — when ``acks`` asks for replicas — ``WAIT`` on the same connection.

    Returns the script's answer; raises :class:`NotReplicated` (carrying it) when too few replicas
    acknowledged. A script's ``-OOM`` is raised as ``OutOfMemoryError``, as ``make_redis``'s clients do.
    ``EVALSHA`` first, loading the script only when the server lacks it (a restarted or promoted one):
    redis-py's own pipelined scripts ask ``SCRIPT EXISTS`` first, a round trip on every call."""
    if acks.replicas == 0:
        return script(keys=keys, args=args)
    for attempt in (1, 2):
        with client.pipeline(transaction=False) as pipe:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.wait(acks.replicas, acks.timeout_ms)
            try:
                result, acknowledged = pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                client.script_load(script.script)
                continue
            except redis.exceptions.ResponseError as exc:
                _raise_if_out_of_memory(exc)
                raise
        return _checked(result, int(acknowledged), acks)
    raise AssertionError("unreachable")  # pragma: no cover


async def run_replicated_async(
    script: AsyncScript,
    keys: ScriptKeys,
    args: ScriptArgs,
    client: aredis.Redis,
    acks: ReplicaAcks = NO_ACKS,
) -> Any:
    """:func:`run_replicated` on an asyncio client."""
    if acks.replicas == 0:
        return await script(keys=keys, args=args)
    for attempt in (1, 2):
        async with client.pipeline(transaction=False) as pipe:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.wait(acks.replicas, acks.timeout_ms)
            try:
                result, acknowledged = await pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                await client.script_load(script.script)
                continue
            except redis.exceptions.ResponseError as exc:
                _raise_if_out_of_memory(exc)
                raise
        return _checked(result, int(acknowledged), acks)
    raise AssertionError("unreachable")  # pragma: no cover


async def wait_for_replicas_async(client: aredis.Redis, acks: ReplicaAcks) -> None:
    """Wait until ``acks`` replicas hold everything the primary had written before this call, whoever
    wrote it: for an answer that wrote nothing itself (an Idempotency-Key replay of a job whose own
    ``WAIT`` timed out). ``WAIT`` only counts its connection's writes, so it follows a write of ours
    (:data:`PROBE_KEY`, expiring), which the replication stream orders after every earlier one."""
    if acks.replicas == 0:
        return
    async with client.pipeline(transaction=False) as pipe:
        pipe.set(PROBE_KEY, b"1", px=60_000)
        pipe.wait(acks.replicas, acks.timeout_ms)
        _, acknowledged = await pipe.execute()
    _checked(None, int(acknowledged), acks)


def _checked(result: Any, acknowledged: int, acks: ReplicaAcks) -> Any:
    if acknowledged < acks.replicas:
        raise NotReplicated(acks.replicas, acknowledged, result)
    return result


def _raise_if_out_of_memory(exc: redis.exceptions.ResponseError) -> None:
    """A script's ``-OOM`` (Redis 6 wraps it in a script error) raised as ``OutOfMemoryError``."""
    from services.clients import out_of_memory  # services.clients imports the lifecycle, which imports us

    if not isinstance(exc, redis.exceptions.OutOfMemoryError) and out_of_memory(exc):
        raise redis.exceptions.OutOfMemoryError(str(exc)) from exc
