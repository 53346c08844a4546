"""The runner's Redis manners: no read before the claim, best-effort progress and cancel checks, an outcome
recorded once, and what one job costs Redis in round trips."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import redis as redis_lib
from rq import Queue

from schemas.jobs import JobStatus
from services.jobs import JobStore, Lifecycle, job_key, new_job_id, utcnow
from services.jobs.outcome import Succeeded
from tests.fixtures.jobs import lifecycle_record, running_job
from tests.fixtures.redis import RedisServerFactory, RoundTrips
from worker.cancel_watch import CancelWatch
from worker.coalescing import Coalescing
from worker.runner import ProgressReporter, WorkerContext, cancel_check, execute_generation, finish

from .test_runner_coalescing import StandInEngine, dequeue, submit
from .test_runner_coalescing import setup as setup  # noqa: F401  (the fixture, re-exported)


def context(connection: redis_lib.Redis) -> WorkerContext:
    unused = cast(Any, None)  # engine and storage play no part here
    return WorkerContext(
        engine=unused,
        store=JobStore(connection, timedelta(days=1)),
        lifecycle=Lifecycle(connection, timedelta(days=1)),
        storage=unused,
        worker_name="worker-a",
        progress_interval=timedelta(0),
    )


def test_an_outcome_is_recorded_once_and_only_while_the_job_is_ours(redis_client: redis_lib.Redis) -> None:
    ctx = context(redis_client)
    record = running_job(redis_client, ctx.lifecycle, "worker-a")
    ctx.hold(record.id)
    assert finish(ctx, record, Succeeded(images=[])) == "succeeded"
    assert record.id not in ctx.held_jobs()  # no more heartbeats for it
    # A second outcome for the same run (a bug, or a late cancel) is refused, and says so.
    assert finish(ctx, record, Succeeded(images=[])) == "discarded:succeeded"
    stored = lifecycle_record(redis_client, record.id)
    assert stored.status is JobStatus.SUCCEEDED and stored.worker == "worker-a"


def test_progress_and_cancel_checks_shrug_off_a_missing_redis(fresh_redis_server: RedisServerFactory) -> None:
    server = fresh_redis_server()
    connection = redis_lib.Redis.from_url(server.url)
    ctx = context(connection)
    record = running_job(connection, ctx.lifecycle, "worker-a")
    server.stop()
    ProgressReporter(ctx, record)(3, 3)  # not recorded, logged; the denoising loop goes on
    assert cancel_check(ctx, record.id)() is False
    server.restart()
    ProgressReporter(ctx, record)(3, 3)
    stored = ctx.store.get(record.id)
    assert stored is not None and stored.progress == {"step": 3, "total": 3}


def test_a_job_gone_or_no_longer_queued_is_skipped_by_its_claim(
    setup: tuple[WorkerContext, Queue, StandInEngine],  # noqa: F811
) -> None:
    ctx, queue, engine = setup
    assert execute_generation(ctx, new_job_id()) == "missing"
    partial = new_job_id()  # what a write that landed after the record was lost would leave
    ctx.store.redis.hset(job_key(partial), mapping={"status": "queued", "progress": "{}"})
    assert execute_generation(ctx, partial) == "missing"
    canceled = submit(ctx, queue, "canceled while queued")
    assert ctx.lifecycle.cancel_queued(canceled, "canceled").applied
    assert execute_generation(ctx, canceled) == "skipped:canceled"
    # Claimed, but unreadable: no job, as for every reader (recovery drops it as it drops an expired one).
    unreadable = new_job_id()
    fields = {"status": "queued", "created_at": utcnow().isoformat(), "request": "{not json"}
    ctx.store.redis.hset(job_key(unreadable), mapping=fields)
    assert execute_generation(ctx, unreadable) == "missing"
    assert engine.calls == [] and ctx.held_jobs() == set()
    assert ctx.store.redis.hget(job_key(partial), "status") == b"queued"


def test_one_job_costs_its_claim_its_progress_writes_and_its_outcome(
    setup: tuple[WorkerContext, Queue, StandInEngine],  # noqa: F811
) -> None:
    """Round trips of one two-step job, cancel watch on, coalescing off: the claim (which reads the record
    back, the cancel flag included), a progress write per step (``progress_interval`` 0 here) and the
    outcome — no read before the claim, no read of the cancel flag after it."""
    ctx, queue, engine = setup
    ctx.coalescing = Coalescing()
    ctx.cancels = CancelWatch(ctx.store.redis, ctx.lifecycle, ctx.worker_name)
    ctx.cancels.start()
    try:
        warm_up = submit(ctx, queue, "loads the scripts")
        assert dequeue(queue) == warm_up and execute_generation(ctx, warm_up) == "succeeded"
        job_id = submit(ctx, queue, "counted")
        assert dequeue(queue) == job_id
        with RoundTrips(ctx.store.redis) as trips:
            assert execute_generation(ctx, job_id) == "succeeded"
        assert trips.count == 1 + engine.steps + 1
    finally:
        ctx.cancels.close()
