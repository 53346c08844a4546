"""The runner's Redis manners: best-effort progress and cancel checks, and an outcome recorded once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import redis as redis_lib

from schemas.jobs import JobStatus
from services.jobs import JobStore, Lifecycle
from services.jobs.outcome import Succeeded
from tests.fixtures.jobs import lifecycle_record, running_job
from tests.fixtures.redis import RedisServerFactory
from worker.runner import ProgressReporter, WorkerContext, cancel_check, finish


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
