"""The GPU worker's RQ bookkeeping per job: what RQ's tools read stays true, what nothing reads is gone.

Real Redis, real RQ queue, the real ``GenerationWorker`` in burst mode; the tasks below look at Redis from
inside the job (``get_current_job``) while it runs."""

from __future__ import annotations

from typing import Any

import redis as redis_lib
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.suspension import suspend
from rq.worker import WorkerStatus

from worker.service import GenerationWorker

WORKER = "darkroom-test-lean"


def seen_while_running() -> dict[str, Any]:
    """What RQ's records say about the running job and its worker, read from inside the job."""
    job = get_current_job()
    assert job is not None
    connection = job.connection

    def text(key: str, field: str) -> str:
        value = connection.hget(key, field)
        return value.decode() if isinstance(value, bytes) else str(value or "")

    return {
        "job_status": text(job.key, "status"),
        "job_worker": text(job.key, "worker_name"),
        "started_at": bool(text(job.key, "started_at")),
        "worker_state": text(f"rq:worker:{WORKER}", "state"),
        "execution_keys": sorted(k.decode() for k in connection.scan_iter("rq:execution*")),
        "started_registry": connection.zcard(StartedJobRegistry(job.origin, connection=connection).key),
    }


def fails() -> None:
    raise RuntimeError("boom")


def run_burst(
    connection: redis_lib.Redis, queue: Queue, worker_class: type[SimpleWorker] = GenerationWorker
) -> Any:
    worker = worker_class([queue], connection=connection, serializer=JSONSerializer, name=WORKER)
    assert worker.work(burst=True)
    return worker


def test_a_running_job_is_started_and_its_worker_busy_without_rq_execution_records(
    redis_client: redis_lib.Redis,
) -> None:
    queue = Queue("lean", connection=redis_client, serializer=JSONSerializer)
    job = queue.enqueue("tests.worker.test_rq_bookkeeping.seen_while_running", result_ttl=60)
    run_burst(redis_client, queue)
    seen = Job.fetch(job.id, connection=redis_client, serializer=JSONSerializer).return_value()
    assert isinstance(seen, dict)
    assert seen["job_status"] == JobStatus.STARTED.value  # `rq info`, RQ's job API: as RQ writes them
    assert seen["job_worker"] == WORKER and seen["started_at"]
    assert seen["worker_state"] == WorkerStatus.BUSY.value
    assert seen["execution_keys"] == [] and seen["started_registry"] == 0  # read by nothing of ours


def test_with_result_ttl_zero_nothing_of_the_job_is_left_in_redis(redis_client: redis_lib.Redis) -> None:
    queue = Queue("lean", connection=redis_client, serializer=JSONSerializer)
    job = queue.enqueue("tests.worker.test_rq_bookkeeping.seen_while_running", result_ttl=0)
    run_burst(redis_client, queue)
    left = sorted(k.decode() for k in redis_client.scan_iter(f"*{job.id}*"))
    assert left == []  # job hash, dependents, results, executions: nothing
    assert FinishedJobRegistry(queue=queue).get_job_ids() == []


def test_a_kept_result_and_the_worker_counts_are_what_rq_records(redis_client: redis_lib.Redis) -> None:
    queue = Queue("lean", connection=redis_client, serializer=JSONSerializer)
    first = queue.enqueue("tests.worker.test_rq_bookkeeping.seen_while_running", result_ttl=60)
    second = queue.enqueue("tests.worker.test_rq_bookkeeping.seen_while_running", result_ttl=60)
    run_burst(redis_client, queue)
    for job in (first, second):
        fetched = Job.fetch(job.id, connection=redis_client, serializer=JSONSerializer)
        assert fetched.get_status() == JobStatus.FINISHED
        result = Result.fetch_latest(fetched, serializer=JSONSerializer)
        assert result is not None and result.type == Result.Type.SUCCESSFUL
        assert 0 < redis_client.ttl(fetched.key) <= 60
    assert set(FinishedJobRegistry(queue=queue).get_job_ids()) == {first.id, second.id}


def test_the_worker_key_counts_jobs_and_is_idle_between_them(redis_client: redis_lib.Redis) -> None:
    queue = Queue("lean", connection=redis_client, serializer=JSONSerializer)
    queue.enqueue("tests.worker.test_rq_bookkeeping.seen_while_running", result_ttl=0)
    worker = GenerationWorker([queue], connection=redis_client, serializer=JSONSerializer, name=WORKER)
    worker.register_birth()
    dequeued = worker.dequeue_job_and_maintain_ttl(timeout=1)
    assert dequeued is not None
    job, dequeued_from = dequeued
    worker.execute_job(job, dequeued_from)
    stats = redis_client.hgetall(worker.key)
    assert stats[b"successful_job_count"] == b"1" and float(stats[b"total_working_time"]) > 0
    assert stats[b"state"] == WorkerStatus.IDLE.value.encode()
    worker.register_death()


def test_a_failing_job_takes_rqs_own_failure_path(redis_client: redis_lib.Redis) -> None:
    queue = Queue("lean", connection=redis_client, serializer=JSONSerializer)
    job = queue.enqueue("tests.worker.test_rq_bookkeeping.fails", failure_ttl=60)
    run_burst(redis_client, queue)
    fetched = Job.fetch(job.id, connection=redis_client, serializer=JSONSerializer)
    assert fetched.get_status() == JobStatus.FAILED
    assert FailedJobRegistry(queue=queue).get_job_ids() == [job.id]
    assert list(redis_client.scan_iter("rq:execution*")) == []


def exists_calls_for(connection: redis_lib.Redis, jobs: int) -> int:
    """``EXISTS`` commands Redis ran for a burst worker that runs ``jobs`` jobs."""
    connection.flushall()
    queue = Queue("lean", connection=connection, serializer=JSONSerializer)
    for _ in range(jobs):
        queue.enqueue("tests.worker.test_rq_bookkeeping.seen_while_running", result_ttl=0)
    before = connection.info("commandstats").get("cmdstat_exists", {}).get("calls", 0)
    run_burst(connection, queue)
    return int(connection.info("commandstats").get("cmdstat_exists", {}).get("calls", 0) - before)


def test_the_suspension_read_at_a_jobs_end_stands_in_for_the_loops_check(
    redis_client: redis_lib.Redis,
) -> None:
    # RQ's loop checks for suspension before every dequeue; the read in a job's closing MULTI, moments
    # earlier, stands in for it: one EXISTS per job, not two.
    assert exists_calls_for(redis_client, 4) - exists_calls_for(redis_client, 1) == 3


def test_a_suspension_is_still_obeyed(redis_client: redis_lib.Redis) -> None:
    queue = Queue("lean", connection=redis_client, serializer=JSONSerializer)
    job = queue.enqueue("tests.worker.test_rq_bookkeeping.seen_while_running", result_ttl=0)
    suspend(redis_client)
    worker = GenerationWorker([queue], connection=redis_client, serializer=JSONSerializer, name=WORKER)
    assert worker.work(burst=True) is False  # suspended in burst mode: RQ's loop stops at once
    assert queue.job_ids == [job.id]
