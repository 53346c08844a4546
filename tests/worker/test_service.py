"""The GPU worker's side threads: lost-job recovery after a Redis outage."""

from __future__ import annotations

from datetime import timedelta

import redis as redis_lib
from rq import Queue
from rq.serializers import JSONSerializer

from schemas.jobs import JobStatus
from services.jobs import JobStore, Lifecycle, utcnow
from services.jobs.keys import RECOVERY_LEASE
from services.settings import Settings
from tests.fixtures.jobs import queued_job
from tests.fixtures.redis import RedisServerFactory
from worker.service import RecoveryLoop


def test_recovery_pauses_after_an_outage_instead_of_robbing_live_workers(
    fresh_redis_server: RedisServerFactory,
) -> None:
    server = fresh_redis_server()
    connection = redis_lib.Redis.from_url(server.url)
    store = JobStore(connection, timedelta(days=1))
    lifecycle = Lifecycle(connection, timedelta(days=1))
    queue = Queue("darkroom", connection=connection, serializer=JSONSerializer)
    record = queued_job(connection, queue=queue)
    connection.lrem(queue.key, 0, record.id)  # RQ's dequeue
    stale = utcnow() - timedelta(seconds=60)  # no heartbeat got through while Redis was away
    assert lifecycle.claim(record, "worker-a", at=stale).applied
    loop = RecoveryLoop(store, lifecycle, queue, Settings(lost_after=timedelta(seconds=20)))

    server.stop()
    loop.run_once()  # Redis down: noted, nothing else
    server.restart()
    loop.run_once()
    stored = store.get(record.id)
    assert stored is not None and stored.status is JobStatus.RUNNING  # every heartbeat is stale now
    loop._resume_at = 0.0  # lost_after later: a worker still silent is lost after all
    loop.run_once()
    stored = store.get(record.id)
    assert stored is not None and stored.status is JobStatus.QUEUED and stored.attempt == 2


def test_only_one_workers_loop_recovers_and_a_stopping_one_hands_the_lease_on(redis_url: str) -> None:
    connection = redis_lib.Redis.from_url(redis_url)
    store = JobStore(connection, timedelta(days=1))
    lifecycle = Lifecycle(connection, timedelta(days=1))
    queue = Queue("darkroom", connection=connection, serializer=JSONSerializer)
    settings = Settings(lost_after=timedelta(seconds=20))
    first, second = (
        RecoveryLoop(store, lifecycle, queue, settings, holder=name) for name in ("worker-a", "worker-b")
    )
    first.run_once()  # worker-a takes the lease
    record = queued_job(connection, queue=queue)
    connection.lrem(queue.key, 0, record.id)  # RQ's dequeue
    assert lifecycle.claim(record, "worker-dead", at=utcnow() - timedelta(seconds=60)).applied
    second.run_once()
    stored = store.get(record.id)
    assert stored is not None and stored.status is JobStatus.RUNNING  # worker-b does not hold the lease
    first.stop()  # never started: stop only gives the lease back
    assert connection.get(RECOVERY_LEASE) is None
    second.run_once()
    stored = store.get(record.id)
    assert stored is not None and stored.status is JobStatus.QUEUED and stored.attempt == 2
    assert connection.get(RECOVERY_LEASE) == b"worker-b"
