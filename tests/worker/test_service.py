"""The GPU worker's side threads: lost-job recovery after a Redis outage."""

from __future__ import annotations

from datetime import timedelta

import redis as redis_lib
from rq import Queue
from rq.serializers import JSONSerializer

from schemas.generation import GenerationRequest
from schemas.jobs import JobStatus
from services.jobs import JobRecord, JobStore, new_job_id, utcnow
from services.settings import Settings
from tests.fixtures.redis import RedisServerFactory
from worker.service import RecoveryLoop

REQUEST = GenerationRequest(prompt="x", seed=1).normalized().model_dump(mode="json", exclude={"init_image"})


def test_recovery_pauses_after_an_outage_instead_of_robbing_live_workers(
    fresh_redis_server: RedisServerFactory,
) -> None:
    server = fresh_redis_server()
    connection = redis_lib.Redis.from_url(server.url)
    store = JobStore(connection, timedelta(days=1))
    queue = Queue("darkroom", connection=connection, serializer=JSONSerializer)
    job_id = new_job_id()
    store.create(JobRecord(id=job_id, status=JobStatus.QUEUED, created_at=utcnow(), request=REQUEST))
    queue.enqueue("worker.tasks.run_generation", job_id, job_id=job_id)
    connection.lrem(queue.key, 0, job_id)
    stale = utcnow() - timedelta(seconds=60)  # no heartbeat got through while Redis was away
    fields = {"started_at": stale, "heartbeat_at": stale, "worker": "worker-a"}
    store.transition(job_id, JobStatus.RUNNING, allowed_from=(JobStatus.QUEUED,), fields=fields)
    loop = RecoveryLoop(store, queue, Settings(lost_after=timedelta(seconds=20)))

    server.stop()
    loop.run_once()  # Redis down: noted, nothing else
    server.restart()
    loop.run_once()
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.RUNNING  # every heartbeat is stale now
    loop._resume_at = 0.0  # lost_after later: a worker still silent is lost after all
    loop.run_once()
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.QUEUED and record.attempt == 2
