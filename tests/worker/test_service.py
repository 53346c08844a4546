"""The GPU worker's side threads: lost-job recovery after a Redis outage, the jobs the heartbeat beats."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import redis as redis_lib
from rq import Queue
from rq.serializers import JSONSerializer

from schemas.jobs import JobStatus
from services.jobs import JobStore, Lifecycle, utcnow
from services.jobs.keys import RECOVERY_LEASE
from services.settings import Settings
from tests.fixtures.jobs import lifecycle_record, queued_job, running_job
from tests.fixtures.redis import RedisServerFactory, RoundTrips
from worker import runner
from worker.runner import ProgressReporter, WorkerContext
from worker.service import RecoveryLoop, job_heartbeat


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


def test_the_heartbeat_skips_a_job_whose_claim_or_progress_write_beat_it_within_the_interval(
    redis_client: redis_lib.Redis,
) -> None:
    unused = cast(Any, None)  # engine and storage play no part here
    ctx = WorkerContext(
        engine=unused,
        store=JobStore(redis_client, timedelta(days=1)),
        lifecycle=Lifecycle(redis_client, timedelta(days=1)),
        storage=unused,
        worker_name="worker-a",
        progress_interval=timedelta(0),
    )
    hourly, every_tick = job_heartbeat(ctx, 3600.0), job_heartbeat(ctx, 0.0)
    job_id = queued_job(redis_client).id
    assert runner.claim(ctx, job_id).applied
    claimed = lifecycle_record(redis_client, job_id)
    with RoundTrips(redis_client) as trips:
        assert hourly(job_id) == 0  # the claim wrote its heartbeat: not a command sent
    assert trips.count == 0
    assert every_tick(job_id) == 1  # an interval later, it is beaten
    beaten = lifecycle_record(redis_client, job_id)
    assert beaten.heartbeat_at is not None and claimed.heartbeat_at is not None
    assert beaten.heartbeat_at > claimed.heartbeat_at

    # Held with no heartbeat of its own known, it is beaten until a progress write beats it instead.
    partner = running_job(redis_client, ctx.lifecycle, "worker-a")
    ctx.hold(partner.id)
    assert ctx.to_beat(job_id, 3600.0) == {partner.id}
    ProgressReporter(ctx, partner)(1, 2)
    assert ctx.to_beat(job_id, 3600.0) == set()
    # A progress write refused (the job is another worker's now) beats nothing, and counts for nothing.
    taken = running_job(redis_client, ctx.lifecycle, "worker-b")
    ctx.hold(taken.id)
    ProgressReporter(ctx, taken)(1, 2)
    assert ctx.to_beat(job_id, 3600.0) == {taken.id}
    # The job RQ runs is beaten whenever it is not held: its claim may have applied unseen.
    ctx.let_go(job_id)
    ctx.let_go(taken.id)
    assert ctx.to_beat(job_id, 3600.0) == {job_id}
