"""The layout of RQ's own records that ``services/rq_records.py`` relies on, pinned for the RQ major version
pyproject allows: if an RQ upgrade moves a key or a field, these fail before a job gets lost.

Each check goes through RQ itself — its ``Job.fetch``, its registries, a real ``SimpleWorker`` running a
job — after our scripts applied what the adapter built.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import rq
from packaging.version import Version
from redis import Redis
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from services import rq_records
from services.jobs import Lifecycle
from services.settings import Settings
from tests.fixtures.jobs import lifecycle_record, queued_job

SUPPORTED_MAJOR = 3  # pyproject: rq>=3,<4


def started_executions() -> list[str]:
    """Run by a real RQ worker (by dotted path): the started registry's members while this job runs."""
    job = get_current_job()
    assert job is not None
    registry = StartedJobRegistry(job.origin, connection=job.connection)
    return [member.decode() for member in job.connection.zrange(registry.key, 0, -1)]


def make_queue(redis: Redis) -> Queue:
    return Queue("darkroom:tiny", connection=redis, serializer=JSONSerializer)


def test_the_installed_rq_is_the_supported_major_version() -> None:
    assert Version(rq.__version__).major == SUPPORTED_MAJOR


def test_key_names(redis_client: Redis) -> None:
    queue = make_queue(redis_client)
    assert rq_records.job_hash_key("gen_1") == "rq:job:gen_1"
    assert rq_records.job_hash_prefix() == "rq:job:"
    assert queue.key == "rq:queue:darkroom:tiny"
    assert rq_records.queues_set_key(queue) == "rq:queues"
    assert StartedJobRegistry(queue=queue).key == "rq:wip:darkroom:tiny"


def test_a_job_hash_built_for_admission_is_one_rq_reads_and_runs(redis_client: Redis) -> None:
    queue = make_queue(redis_client)
    fields: dict[str, Any] = rq_records.generation_job_fields(queue, "gen_a", Settings())
    redis_client.hset(rq_records.job_hash_key("gen_a"), mapping=fields)
    redis_client.rpush(queue.key, "gen_a")
    job = Job.fetch("gen_a", connection=redis_client, serializer=JSONSerializer)
    assert (job.func_name, list(job.args), job.origin) == (rq_records.GENERATION_TASK, ["gen_a"], queue.name)
    assert job.get_status() == JobStatus.QUEUED and job.timeout == 600
    assert queue.job_ids == ["gen_a"] and rq_records.queue_position(redis_client, queue, "gen_a") == 1


def test_executions_are_job_id_colon_execution_id_in_the_started_registry(redis_client: Redis) -> None:
    queue = make_queue(redis_client)
    job = queue.enqueue(f"{__name__}.started_executions", job_id="gen_b")
    SimpleWorker([queue], connection=redis_client, serializer=JSONSerializer).work(burst=True)
    job.refresh()
    [member] = job.return_value()
    job_id, execution_id = member.split(":", 1)
    assert job_id == "gen_b" and execution_id


def test_a_requeue_leaves_a_job_rq_runs_again_first(redis_client: Redis) -> None:
    queue = make_queue(redis_client)
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    queue.enqueue(f"{__name__}.started_executions", job_id="gen_waiting")
    record = queued_job(redis_client)
    queue.enqueue(f"{__name__}.started_executions", job_id=record.id)
    redis_client.lrem(queue.key, 0, record.id)  # a worker dequeued it and started it, then died
    registry = StartedJobRegistry(queue=queue)
    redis_client.zadd(registry.key, {f"{record.id}:dead-execution": 9_999_999_999})
    assert lifecycle.claim(record, "dead-worker").applied
    running = lifecycle_record(redis_client, record.id)

    change = rq_records.requeued_at_front(redis_client, queue, record.id)
    assert lifecycle.requeue(running, guard=("worker", "dead-worker"), rq=change).applied

    assert queue.job_ids == [record.id, "gen_waiting"]
    assert redis_client.zrange(registry.key, 0, -1) == []
    job = Job.fetch(record.id, connection=redis_client, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED and job.started_at is None
    SimpleWorker([queue], connection=redis_client, serializer=JSONSerializer).work(burst=True)
    assert Job.fetch(record.id, connection=redis_client, serializer=JSONSerializer).get_status() == (
        JobStatus.FINISHED
    )


def test_a_partner_taken_and_closed_looks_to_rq_like_a_job_it_ran(redis_client: Redis) -> None:
    queue = make_queue(redis_client)
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    record = queued_job(redis_client, queue=queue)

    assert lifecycle.claim(record, "worker-a", rq=rq_records.taken_by(queue, record.id, "worker-a")).applied
    assert queue.job_ids == []
    job = Job.fetch(record.id, connection=redis_client, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.STARTED and job.worker_name == "worker-a"

    rq_records.finish_taken_job(queue, record.id, "succeeded", "worker-a")
    job = Job.fetch(record.id, connection=redis_client, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED and job.return_value() == "succeeded"
    assert record.id in FinishedJobRegistry(queue=queue).get_job_ids()


def test_a_cancel_takes_the_id_off_rqs_list(redis_client: Redis) -> None:
    queue = make_queue(redis_client)
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    record = queued_job(redis_client, queue=queue)
    assert lifecycle.cancel_queued(record.id, "canceled", rq=rq_records.remove_from_queue(queue)).applied
    assert queue.job_ids == [] and rq_records.queue_position(redis_client, queue, record.id) is None


def test_an_unclaimed_job_is_put_back_once(redis_client: Redis) -> None:
    queue = make_queue(redis_client)
    record = queued_job(redis_client, queue=queue)
    redis_client.lrem(queue.key, 0, record.id)  # popped by RQ, never claimed
    assert rq_records.put_back_at_front(redis_client, queue, record.id)
    assert not rq_records.put_back_at_front(redis_client, queue, record.id)
    assert queue.job_ids == [record.id]


def test_rq_keeps_no_finished_job_by_default(redis_client: Redis) -> None:
    """``result_ttl`` 0 (the default: nothing reads RQ's results, our record has the outcome): a job RQ ran
    leaves neither its hash, nor a result, nor a finished-registry entry."""
    assert Settings().result_ttl == timedelta(0)
    queue = make_queue(redis_client)
    ttl = int(Settings().result_ttl.total_seconds())
    job = queue.enqueue(f"{__name__}.started_executions", result_ttl=ttl)
    SimpleWorker([queue], connection=redis_client, serializer=JSONSerializer).work(burst=True)
    assert not Job.exists(job.id, connection=redis_client)
    assert list(redis_client.scan_iter(match=f"*{job.id}*")) == []
    assert FinishedJobRegistry(queue=queue).get_job_ids() == []


def test_a_partner_closed_with_result_ttl_0_leaves_nothing(redis_client: Redis) -> None:
    queue = make_queue(redis_client)
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    record = queued_job(redis_client, queue=queue)
    job = Job.fetch(record.id, connection=redis_client, serializer=JSONSerializer)
    job.result_ttl = 0
    job.save()
    assert lifecycle.claim(record, "worker-a", rq=rq_records.taken_by(queue, record.id, "worker-a")).applied

    rq_records.finish_taken_job(queue, record.id, "succeeded", "worker-a")

    assert not Job.exists(record.id, connection=redis_client)
    assert list(redis_client.scan_iter(match=f"rq:results:{record.id}*")) == []
    assert FinishedJobRegistry(queue=queue).get_job_ids() == []
