"""Lost-job recovery against a real Redis and real RQ records."""

from __future__ import annotations

from datetime import timedelta

import redis as redis_lib
from rq import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from schemas.jobs import JobStatus
from services.jobs import JobStore, Lifecycle, job_key, utcnow
from services.jobs.outcome import Succeeded
from services.jobs.recovery import Recovered, recover_lost_jobs, release_interrupted_job
from services.rq_records import GENERATION_TASK, RqChange, queue_position
from tests.fixtures.jobs import lifecycle_record, queued_job, running_job

LOST_AFTER = timedelta(seconds=20)
DEAD_WORKER = "darkroom-dead-1"


class Fleet:
    """A real Redis with one RQ queue, the store and the lifecycle, as every worker's recovery sees them."""

    def __init__(self, redis_url: str) -> None:
        connection = redis_lib.Redis.from_url(redis_url)
        self.store = JobStore(connection, timedelta(days=1))
        self.lifecycle = Lifecycle(connection, timedelta(days=1))
        self.queue = Queue("darkroom", connection=connection, serializer=JSONSerializer)

    def recover(self) -> list[Recovered]:
        return recover_lost_jobs(
            self.store, self.lifecycle, self.queue, lost_after=LOST_AFTER, max_attempts=3
        )

    def running_job(self, *, attempt: int = 1, silent_for: float = 60.0) -> str:
        """A job as a worker leaves it when SIGKILLed: running, in RQ's started registry, heartbeat stale."""
        redis = self.queue.connection
        created = utcnow() - timedelta(seconds=silent_for + 5)
        record = queued_job(redis, queue=self.queue, created_at=created)
        redis.lrem(self.queue.key, 0, record.id)  # dequeued by the worker...
        redis.zadd(
            StartedJobRegistry(queue=self.queue).key, {f"{record.id}:exec-1": 9999999999}
        )  # ...started
        assert self.lifecycle.claim(record, DEAD_WORKER, at=utcnow() - timedelta(seconds=silent_for)).applied
        redis.hset(job_key(record.id), "attempt", attempt)
        return record.id


def test_a_silent_running_job_is_requeued_at_the_front(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    store, queue = fleet.store, fleet.queue
    queue.enqueue(GENERATION_TASK, "gen_waiting", job_id="gen_waiting")
    job_id = fleet.running_job()
    [done] = fleet.recover()
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
    fleet = Fleet(redis_url)
    job_id = fleet.running_job(silent_for=2)
    assert fleet.recover() == []
    record = fleet.store.get(job_id)
    assert record is not None and record.status is JobStatus.RUNNING


def test_a_job_lost_too_often_fails_as_worker_lost(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    job_id = fleet.running_job(attempt=3)
    [done] = fleet.recover()
    assert done.action == "failed"
    record = fleet.store.get(job_id)
    assert record is not None and record.status is JobStatus.FAILED
    assert record.error is not None and record.error["type"] == "worker_lost"
    assert job_id not in fleet.queue.get_job_ids()
    registry_members = fleet.queue.connection.zrange(StartedJobRegistry(queue=fleet.queue).key, 0, -1)
    assert not any(m.decode().startswith(job_id) for m in registry_members)


def test_a_heartbeat_arriving_during_the_pass_wins(redis_url: str) -> None:
    """The requeue is guarded by the heartbeat judged stale: a worker that just beat keeps its job."""
    fleet = Fleet(redis_url)
    job_id = fleet.running_job()
    stale = lifecycle_record(fleet.store.redis, job_id)
    assert fleet.lifecycle.beat([job_id], DEAD_WORKER) == 1  # it was only slow: it beats again
    moved = fleet.lifecycle.requeue(
        stale,
        guard=("heartbeat_at", stale.heartbeat_at.isoformat()),
        rq=RqChange(),  # type: ignore[union-attr]
    )
    assert not moved.applied
    assert fleet.store.get(job_id).status is JobStatus.RUNNING  # type: ignore[union-attr]


def test_a_presumed_dead_worker_cannot_overwrite_the_rerun(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    job_id = fleet.running_job()
    stale = lifecycle_record(fleet.store.redis, job_id)
    fleet.recover()
    requeued = lifecycle_record(fleet.store.redis, job_id)
    fleet.queue.connection.lrem(fleet.queue.key, 0, job_id)
    assert fleet.lifecycle.claim(requeued, "darkroom-new-1").applied
    late = fleet.lifecycle.finish(stale, DEAD_WORKER, Succeeded(images=[]))
    assert not late.applied
    assert fleet.store.get(job_id).status is JobStatus.RUNNING  # type: ignore[union-attr]
    assert fleet.lifecycle.beat([job_id], DEAD_WORKER) == 0  # nor beat it, nor write its progress
    assert not fleet.lifecycle.progress(job_id, DEAD_WORKER, 1, 2)


def test_an_expired_running_job_is_dropped_from_the_running_set(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    job_id = fleet.running_job()
    fleet.store.redis.delete(job_key(job_id))
    assert [(r.job_id, r.action) for r in fleet.recover()] == [(job_id, "dropped")]
    assert fleet.store.running_job_ids() == []
    assert fleet.lifecycle.beat([job_id], DEAD_WORKER) == 0
    assert not fleet.store.redis.exists(job_key(job_id))  # a late beat does not recreate a partial record


# --- a worker's own interrupted run (release_interrupted_job) --------------------------------------------


def test_a_job_left_running_under_our_name_is_put_back_at_once(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    store, lifecycle, queue = fleet.store, fleet.lifecycle, fleet.queue
    queue.enqueue(GENERATION_TASK, "gen_waiting", job_id="gen_waiting")
    job_id = running_job(store.redis, lifecycle, "worker-a", queue=queue).id
    done = release_interrupted_job(store, lifecycle, queue, job_id, worker_name="worker-a", max_attempts=3)
    assert done is not None and (done.action, done.attempt) == ("requeued", 2)
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.QUEUED and record.worker is None
    assert queue_position(queue.connection, queue, job_id) == 1  # ahead of the one already waiting
    # Called again (or for a job another worker now runs), nothing more happens.
    again = release_interrupted_job(store, lifecycle, queue, job_id, worker_name="worker-a", max_attempts=3)
    assert again is None


def test_a_job_popped_but_never_claimed_goes_back_on_the_queue(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    store, lifecycle, queue = fleet.store, fleet.lifecycle, fleet.queue
    job_id = queued_job(store.redis, queue=queue).id
    queue.connection.lrem(queue.key, 0, job_id)  # RQ popped it; Redis went away before the claim
    assert queue_position(queue.connection, queue, job_id) is None
    done = release_interrupted_job(store, lifecycle, queue, job_id, worker_name="worker-a", max_attempts=3)
    assert done is not None and done.action == "requeued"
    assert queue_position(queue.connection, queue, job_id) == 1


def test_jobs_that_are_fine_are_left_alone(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    store, lifecycle, queue = fleet.store, fleet.lifecycle, fleet.queue

    def release(job_id: str) -> Recovered | None:
        return release_interrupted_job(
            store, lifecycle, queue, job_id, worker_name="worker-a", max_attempts=3
        )

    elsewhere = running_job(store.redis, lifecycle, "worker-b", queue=queue)
    assert release(elsewhere.id) is None
    finished = running_job(store.redis, lifecycle, "worker-a", queue=queue)
    assert lifecycle.finish(finished, "worker-a", Succeeded(images=[])).applied
    assert release(finished.id) is None
    assert release("gen_gone") is None
    assert queue.get_job_ids() == []
