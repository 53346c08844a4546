"""Lost-job recovery against a real Redis and real RQ records."""

from __future__ import annotations

from datetime import timedelta

import redis as redis_lib
from rq import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from schemas.generation import GenerationRequest
from schemas.jobs import JobStatus
from services.jobs import JobRecord, JobStore, new_job_id, utcnow
from services.queue import GENERATION_TASK
from services.recovery import recover_lost_jobs

LOST_AFTER = timedelta(seconds=20)


def running_job(store: JobStore, queue: Queue, *, attempt: int = 1, silent_for: float = 60.0) -> str:
    """A job as a worker leaves it when SIGKILLed: running, in RQ's started registry, heartbeat stale."""
    job_id = new_job_id()
    request = (
        GenerationRequest(prompt="x", seed=1).normalized().model_dump(mode="json", exclude={"init_image"})
    )
    created = utcnow() - timedelta(seconds=silent_for + 5)
    store.create(JobRecord(id=job_id, status=JobStatus.QUEUED, created_at=created, request=request))
    queue.enqueue(GENERATION_TASK, job_id, job_id=job_id)
    queue.connection.lrem(queue.key, 0, job_id)  # dequeued by the worker...
    queue.connection.zadd(
        StartedJobRegistry(queue=queue).key, {f"{job_id}:exec-1": 9999999999}
    )  # ...which started it
    beat = utcnow() - timedelta(seconds=silent_for)
    store.transition(
        job_id,
        JobStatus.RUNNING,
        allowed_from=(JobStatus.QUEUED,),
        fields={"started_at": beat, "heartbeat_at": beat, "worker": "darkroom-dead-1", "attempt": attempt},
    )
    return job_id


def setup(redis_url: str) -> tuple[JobStore, Queue]:
    connection = redis_lib.Redis.from_url(redis_url)
    return JobStore(connection, timedelta(days=1)), Queue(
        "darkroom", connection=connection, serializer=JSONSerializer
    )


def test_a_silent_running_job_is_requeued_at_the_front(redis_url: str) -> None:
    store, queue = setup(redis_url)
    queue.enqueue(GENERATION_TASK, "gen_waiting", job_id="gen_waiting")
    job_id = running_job(store, queue)
    [done] = recover_lost_jobs(store, queue, lost_after=LOST_AFTER, max_attempts=3)
    assert (done.job_id, done.action, done.attempt) == (job_id, "requeued", 2)
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.QUEUED
    assert record.attempt == 2 and record.worker is None and record.progress is None
    assert queue.get_job_ids()[0] == job_id  # ahead of the job that was already waiting
    registry_members = queue.connection.zrange(StartedJobRegistry(queue=queue).key, 0, -1)
    assert not any(m.decode().startswith(job_id) for m in registry_members)
    assert store.running_job_ids() == []
    assert [e["data"]["status"] for _, e in store.events_since(job_id)][-2:] == ["running", "queued"]


def test_a_job_with_a_fresh_heartbeat_is_left_alone(redis_url: str) -> None:
    store, queue = setup(redis_url)
    job_id = running_job(store, queue, silent_for=2)
    assert recover_lost_jobs(store, queue, lost_after=LOST_AFTER, max_attempts=3) == []
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.RUNNING


def test_a_job_lost_too_often_fails_as_worker_lost(redis_url: str) -> None:
    store, queue = setup(redis_url)
    job_id = running_job(store, queue, attempt=3)
    [done] = recover_lost_jobs(store, queue, lost_after=LOST_AFTER, max_attempts=3)
    assert done.action == "failed"
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.FAILED
    assert record.error is not None and record.error["type"] == "worker_lost"
    assert job_id not in queue.get_job_ids()


def test_a_heartbeat_arriving_during_the_pass_wins(redis_url: str) -> None:
    """The requeue is guarded by the heartbeat judged stale: a worker that just beat keeps its job."""
    store, queue = setup(redis_url)
    job_id = running_job(store, queue)
    record = store.get(job_id)
    assert record is not None and record.heartbeat_at is not None
    store.set_fields(job_id, {"heartbeat_at": utcnow()})
    stale_view = record.heartbeat_at.isoformat()
    moved = store.transition(
        job_id,
        JobStatus.QUEUED,
        allowed_from=(JobStatus.RUNNING,),
        guard=("heartbeat_at", stale_view),
    )
    assert not moved.applied
    assert store.get(job_id).status is JobStatus.RUNNING  # type: ignore[union-attr]


def test_a_presumed_dead_worker_cannot_overwrite_the_rerun(redis_url: str) -> None:
    store, queue = setup(redis_url)
    job_id = running_job(store, queue)
    recover_lost_jobs(store, queue, lost_after=LOST_AFTER, max_attempts=3)
    store.transition(
        job_id, JobStatus.RUNNING, allowed_from=(JobStatus.QUEUED,), fields={"worker": "darkroom-new-1"}
    )
    late = store.transition(
        job_id,
        JobStatus.SUCCEEDED,
        allowed_from=(JobStatus.RUNNING,),
        fields={"images": []},
        guard=("worker", "darkroom-dead-1"),
    )
    assert not late.applied
    assert store.get(job_id).status is JobStatus.RUNNING  # type: ignore[union-attr]
