"""WAIT for a replica: what is acknowledged is on the replica; a stopped replica gets the documented answer.

A real primary and a real replica (``replicaof``): stopping the replica is what makes ``WAIT`` time out.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
import redis
import redis.asyncio as aredis

from devtools.redis_server import RedisServer
from schemas.jobs import JobStatus
from services import metrics
from services.admission import Admitter, IdempotencyClaim
from services.clients import REDIS_UNAVAILABLE, make_redis
from services.jobs import JobRecord, Lifecycle, new_job_id, utcnow
from services.jobs.outcome import Succeeded
from services.queue import generation_queue
from services.replication import NotReplicated, ReplicaAcks, run_replicated
from services.settings import Settings
from tests.fixtures.jobs import REQUEST, lifecycle_record, running_job
from tests.fixtures.redis import wait_in_sync

ACKS = ReplicaAcks(replicas=1, timeout_ms=300)
SET_SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]"


def ack_timeouts(write: str) -> float:
    return metrics.REPLICA_ACK_TIMEOUTS.labels(write)._value.get()


def test_an_acknowledged_write_is_on_the_replica(redis_pair: tuple[RedisServer, RedisServer]) -> None:
    primary, replica = redis_pair
    client = make_redis(primary.url)
    script = client.register_script(SET_SCRIPT)
    assert run_replicated(script, ["k"], ["v1"], client, ACKS) == b"v1"
    with redis.Redis.from_url(replica.url) as on_replica:
        assert on_replica.get("k") == b"v1"  # WAIT returned: the replica has it, no polling needed


def test_a_stopped_replica_times_out_and_the_write_is_on_the_primary_only(
    redis_pair: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = redis_pair
    client = make_redis(primary.url)
    script = client.register_script(SET_SCRIPT)
    replica.stop()
    started = time.monotonic()
    with pytest.raises(NotReplicated) as caught:
        run_replicated(script, ["k"], ["v2"], client, ACKS)
    assert time.monotonic() - started >= ACKS.timeout_ms / 1000 * 0.9
    assert caught.value.result == b"v2" and caught.value.acknowledged == 0
    assert isinstance(caught.value, REDIS_UNAVAILABLE)  # workers and the API treat it as "Redis away"
    assert client.get("k") == b"v2"


def test_without_required_acks_nothing_waits(redis_pair: tuple[RedisServer, RedisServer]) -> None:
    primary, replica = redis_pair
    client = make_redis(primary.url)
    replica.stop()
    started = time.monotonic()
    assert run_replicated(client.register_script(SET_SCRIPT), ["k"], ["v"], client) == b"v"
    assert time.monotonic() - started < 0.25


def test_a_job_end_no_replica_acknowledges_is_logged_and_still_made(
    redis_pair: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = redis_pair
    client = make_redis(primary.url)
    lifecycle = Lifecycle(client, timedelta(days=1), acks=ACKS)
    record = running_job(client, lifecycle, "w1")
    before = ack_timeouts("job_end")
    replica.stop()
    done = lifecycle.finish(record, "w1", Succeeded(images=[]))
    assert done.applied and done.previous is JobStatus.RUNNING
    assert lifecycle_record(client, record.id).status is JobStatus.SUCCEEDED
    assert ack_timeouts("job_end") == before + 1
    # Only a job's end waits: a claim with no replica goes through without waiting.
    other = running_job(client, lifecycle, "w1")
    assert lifecycle_record(client, other.id).status is JobStatus.RUNNING


def _admit(url: str, record: JobRecord, claim: IdempotencyClaim | None, **settings: object) -> str:
    async def main() -> str:
        client = aredis.Redis.from_url(url)
        try:
            config = Settings(
                auth_disabled=True,
                redis_min_replica_acks=1,
                redis_replica_ack_timeout=timedelta(milliseconds=300),
                **settings,  # type: ignore[arg-type]
            )
            queue = generation_queue(redis.Redis.from_url(url), config)
            admission = await Admitter(client, queue, config, None).admit(record, "alice", claim)
            return admission.outcome
        finally:
            await client.aclose()

    return asyncio.run(main())


def _record() -> JobRecord:
    return JobRecord(
        id=new_job_id(), status=JobStatus.QUEUED, created_at=utcnow(), request=REQUEST, owner="alice"
    )


def test_an_admission_no_replica_acknowledges_raises_and_its_replay_returns_the_job(
    redis_pair: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = redis_pair
    record = _record()
    claim = IdempotencyClaim(
        key="darkroom:idempotency:k1", created={"job_id": record.id}, fingerprint="f", ttl=timedelta(hours=1)
    )
    assert _admit(primary.url, record, claim) == "queued"  # replica up: acknowledged
    replica.stop()
    before = ack_timeouts("admission")
    second = _record()
    with pytest.raises(NotReplicated):
        _admit(primary.url, second, None)
    assert ack_timeouts("admission") == before + 1
    with redis.Redis.from_url(primary.url) as client:
        assert client.exists(f"darkroom:job:{second.id}")  # on the primary: a replay must find it
    assert _admit(primary.url, _record(), None, max_queue_depth=1) == "queue_full"  # refused: answered
    # A replay wrote nothing, but may return a job no replica has yet: it waits for one all the same.
    with pytest.raises(NotReplicated):
        _admit(primary.url, _record(), claim)
    replica.start()
    wait_in_sync(primary)
    assert _admit(primary.url, _record(), claim) == "replay"


def test_a_server_without_the_script_gets_it_loaded(redis_pair: tuple[RedisServer, RedisServer]) -> None:
    """A promoted replica or a restarted primary has no cached scripts: EVALSHA's NOSCRIPT loads it."""
    primary, _ = redis_pair
    client = make_redis(primary.url)
    script = client.register_script(SET_SCRIPT)
    client.script_flush()
    assert run_replicated(script, ["k"], ["v3"], client, ACKS) == b"v3"
    assert client.script_exists(script.sha) == [True]
