"""The pieces that let workers ride out a Redis restart, one by one (the whole story, with real processes,
is tests/api/test_redis_outage.py)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import timedelta

import pytest
import redis as redis_lib
from rq import Queue
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from schemas.generation import GenerationRequest
from schemas.jobs import JobStatus
from services.clients import make_redis, retry_while_redis_down
from services.jobs import JobRecord, JobStore, new_job_id, utcnow
from services.queue import GENERATION_TASK, queue_position
from services.recovery import release_interrupted_job
from services.rq_workers import ResilientScheduler, ResilientWorker
from tests.fixtures.redis import RedisServerFactory

REQUEST = GenerationRequest(prompt="x", seed=1).normalized().model_dump(mode="json", exclude={"init_image"})


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def flaky(failures: int) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def operation() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise redis_lib.ConnectionError("Connection refused")
        return "ok"

    return calls, operation


def test_retry_while_redis_down_backs_off_until_redis_answers() -> None:
    clock = FakeClock()
    calls, operation = flaky(5)
    result = retry_while_redis_down(operation, what="t", deadline_s=60, sleep=clock.sleep, clock=clock)
    assert result == "ok" and len(calls) == 6
    assert clock.sleeps == [0.25, 0.5, 1.0, 2.0, 2.0]  # doubling, capped at 2 s


def test_retry_while_redis_down_gives_up_at_the_deadline_or_on_a_stop_request() -> None:
    clock = FakeClock()
    _, operation = flaky(100)
    with pytest.raises(redis_lib.ConnectionError):
        retry_while_redis_down(operation, what="t", deadline_s=5, sleep=clock.sleep, clock=clock)
    assert clock.now == pytest.approx(5.0)
    calls, operation = flaky(100)
    with pytest.raises(redis_lib.ConnectionError):
        retry_while_redis_down(operation, what="t", should_stop=lambda: True, sleep=clock.sleep, clock=clock)
    assert len(calls) == 1


def test_retry_while_redis_down_lets_other_errors_through_at_once() -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise redis_lib.ResponseError("WRONGTYPE")

    with pytest.raises(redis_lib.ResponseError):
        retry_while_redis_down(broken, what="t", sleep=lambda _: None)
    assert calls == [1]


def test_the_client_fails_fast_when_redis_is_down(fresh_redis_server: RedisServerFactory) -> None:
    server = fresh_redis_server()
    client = make_redis(server.url)
    assert client.ping()
    server.stop()
    with pytest.raises(redis_lib.ConnectionError):
        client.ping()
    server.restart()
    assert client.ping()  # the pooled connection died with the server: the client reconnects by itself


def setup(redis_url: str) -> tuple[JobStore, Queue]:
    connection = redis_lib.Redis.from_url(redis_url)
    store = JobStore(connection, timedelta(days=1))
    return store, Queue("darkroom", connection=connection, serializer=JSONSerializer)


def new_job(store: JobStore, queue: Queue, *, running_on: str | None) -> str:
    """A job popped off the queue by a worker (and claimed by ``running_on``, if given)."""
    job_id = new_job_id()
    store.create(JobRecord(id=job_id, status=JobStatus.QUEUED, created_at=utcnow(), request=REQUEST))
    queue.enqueue(GENERATION_TASK, job_id, job_id=job_id)
    queue.connection.lrem(queue.key, 0, job_id)
    if running_on is not None:
        fields = {"started_at": utcnow(), "worker": running_on}
        store.transition(job_id, JobStatus.RUNNING, allowed_from=(JobStatus.QUEUED,), fields=fields)
    return job_id


def test_a_job_left_running_under_our_name_is_put_back_at_once(redis_url: str) -> None:
    store, queue = setup(redis_url)
    queue.enqueue(GENERATION_TASK, "gen_waiting", job_id="gen_waiting")
    job_id = new_job(store, queue, running_on="worker-a")
    done = release_interrupted_job(store, queue, job_id, worker_name="worker-a", max_attempts=3)
    assert done is not None and (done.action, done.attempt) == ("requeued", 2)
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.QUEUED and record.worker is None
    assert queue_position(queue.connection, queue, job_id) == 1  # ahead of the one already waiting
    # Called again (or for a job another worker now runs), nothing more happens.
    assert release_interrupted_job(store, queue, job_id, worker_name="worker-a", max_attempts=3) is None


def test_a_job_popped_but_never_claimed_goes_back_on_the_queue(redis_url: str) -> None:
    store, queue = setup(redis_url)
    job_id = new_job(store, queue, running_on=None)
    assert queue_position(queue.connection, queue, job_id) is None
    done = release_interrupted_job(store, queue, job_id, worker_name="worker-a", max_attempts=3)
    assert done is not None and done.action == "requeued"
    assert queue_position(queue.connection, queue, job_id) == 1


def test_jobs_that_are_fine_are_left_alone(redis_url: str) -> None:
    store, queue = setup(redis_url)
    elsewhere = new_job(store, queue, running_on="worker-b")
    assert release_interrupted_job(store, queue, elsewhere, worker_name="worker-a", max_attempts=3) is None
    finished = new_job(store, queue, running_on="worker-a")
    store.transition(finished, JobStatus.SUCCEEDED, allowed_from=(JobStatus.RUNNING,))
    assert release_interrupted_job(store, queue, finished, worker_name="worker-a", max_attempts=3) is None
    assert release_interrupted_job(store, queue, "gen_gone", worker_name="worker-a", max_attempts=3) is None
    assert queue.get_job_ids() == []


def test_the_resilient_worker_starts_a_resilient_scheduler(redis_url: str) -> None:
    connection = redis_lib.Redis.from_url(redis_url)
    worker = ResilientWorker([Queue("hooks", connection=connection)], connection=connection)
    assert not worker.stopped_on_request
    worker._start_scheduler(burst=True)  # burst: enqueues what is due, then lets go of the lock
    assert isinstance(worker.scheduler, ResilientScheduler)


def test_a_stop_request_and_the_teardown_during_an_outage_raise_nothing(
    fresh_redis_server: RedisServerFactory,
) -> None:
    server = fresh_redis_server()
    connection = make_redis(server.url)
    worker = ResilientWorker([Queue("q", connection=connection)], connection=connection)
    worker.set_state(WorkerStatus.BUSY)
    server.stop()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # RQ writes the request to Redis from inside the SIGTERM handler, i.e. from inside the running job:
        # an error there would fail the very job a warm shutdown means to let finish.
        worker.request_stop(signal.SIGTERM, None)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert worker.stopped_on_request
    worker.teardown()  # the worker's key expires by itself
