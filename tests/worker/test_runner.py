"""The runner's Redis manners: best-effort progress and cancel checks, and an outcome recorded once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import redis as redis_lib

from schemas.generation import GenerationRequest
from schemas.jobs import JobStatus
from services.jobs import JobRecord, JobStore, new_job_id, utcnow
from tests.fixtures.redis import RedisServerFactory
from worker.runner import ProgressReporter, WorkerContext, _transition_once, cancel_check

REQUEST = GenerationRequest(prompt="x", seed=1).normalized().model_dump(mode="json", exclude={"init_image"})


def context(store: JobStore) -> WorkerContext:
    unused = cast(Any, None)  # engine, storage and webhook queue play no part here
    return WorkerContext(
        engine=unused,
        store=store,
        storage=unused,
        webhook_queue=unused,
        worker_name="worker-a",
        progress_interval=timedelta(0),
    )


def running_job(store: JobStore) -> JobRecord:
    record = JobRecord(id=new_job_id(), status=JobStatus.QUEUED, created_at=utcnow(), request=REQUEST)
    store.create(record)
    fields = {"started_at": utcnow(), "worker": "worker-a"}
    store.transition(record.id, JobStatus.RUNNING, allowed_from=(JobStatus.QUEUED,), fields=fields)
    return record


def test_a_change_whose_reply_was_lost_counts_as_made(redis_url: str) -> None:
    store = JobStore(redis_lib.Redis.from_url(redis_url), timedelta(days=1))
    ctx = context(store)
    job_id = running_job(store).id
    running = (JobStatus.RUNNING,)
    fields: dict[str, Any] = {"completed_at": utcnow(), "images": []}

    def finish(fields: dict[str, Any]) -> Any:
        return _transition_once(
            ctx, job_id, JobStatus.SUCCEEDED, running, fields, "completed_at", guarded=True
        )

    assert finish(fields).applied
    # The script ran but the connection died before its reply: the retry finds exactly our outcome.
    assert finish(fields).applied
    # Someone else's outcome (another completion time) is not mistaken for ours.
    done = finish({**fields, "completed_at": utcnow() + timedelta(seconds=1)})
    assert not done.applied and done.previous is JobStatus.SUCCEEDED


def test_progress_and_cancel_checks_shrug_off_a_missing_redis(fresh_redis_server: RedisServerFactory) -> None:
    server = fresh_redis_server()
    store = JobStore(redis_lib.Redis.from_url(server.url), timedelta(days=1))
    ctx = context(store)
    record = running_job(store)
    server.stop()
    ProgressReporter(ctx, record)(3, 3)  # not recorded, logged; the denoising loop goes on
    assert cancel_check(ctx, record.id)() is False
    server.restart()
    ProgressReporter(ctx, record)(3, 3)
    stored = store.get(record.id)
    assert stored is not None and stored.progress == {"step": 3, "total": 3}
