"""The stranded-job rule against a real Redis: which queued jobs the API's sweep fails ``model_unavailable``,
and which it leaves waiting (a worker ready or loading, a model still accepted within the grace)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import redis as redis_lib
from rq import Queue
from rq.serializers import JSONSerializer

from schemas.jobs import JobStatus
from services import fleet
from services.jobs import JobStore, Lifecycle, utcnow
from services.jobs.keys import OUTBOX
from services.jobs.outbox import OutboxEvent
from services.jobs.unserved import fail_unserved_jobs
from services.settings import Settings
from tests.fixtures.jobs import REQUEST, queued_job

GRACE = timedelta(minutes=10)
HOOK = {"url": "https://receiver.example/hook", "events": ["generation.failed"]}


class Fleet:
    def __init__(self, redis: redis_lib.Redis, unserved_after: timedelta = GRACE) -> None:
        self.redis = redis
        self.settings = Settings(redis_url="redis://unused", unserved_after=unserved_after)
        self.lifecycle = Lifecycle(redis, timedelta(days=1))
        self.store = JobStore(redis, timedelta(days=1))

    def queue(self, model: str, *, batch: bool = False) -> Queue:
        prefix = self.settings.batch_queue_name if batch else self.settings.queue_name
        return Queue(f"{prefix}:{model}", connection=self.redis, serializer=JSONSerializer)

    def submit(self, model: str, *, waited: timedelta = timedelta(0), batch: bool = False) -> str:
        job = queued_job(
            self.redis,
            queue=self.queue(model, batch=batch),
            webhook=HOOK,
            created_at=utcnow() - waited,
            request={**REQUEST, "model": model},
        )
        return job.id

    def sweep(self, *, accepted: tuple[str, ...] = ()) -> set[str]:
        done = fail_unserved_jobs(self.redis, self.lifecycle, self.settings, accepted=accepted)
        return {stranded.job_id for stranded in done}

    def status(self, job_id: str) -> JobStatus:
        record = self.store.get(job_id)
        assert record is not None
        return record.status


@pytest.fixture
def world(redis_client: redis_lib.Redis) -> Fleet:
    return Fleet(redis_client)


def test_a_model_no_api_accepts_and_no_worker_serves_fails_its_jobs_at_once(world: Fleet) -> None:
    """The dev fallback: jobs for the hub model, the API restarted on the tiny model, no hub worker."""
    waiting = world.submit("owner/hub-model")
    item = world.submit("owner/hub-model", batch=True)
    served = world.submit("tiny")
    fleet.announce(world.redis, "tiny", "w1", ttl_s=20)
    assert world.sweep(accepted=("tiny",)) == {waiting, item}
    assert world.status(served) is JobStatus.QUEUED
    for job_id in (waiting, item):
        record = world.store.get(job_id)
        assert record is not None and record.status is JobStatus.FAILED
        assert record.error is not None and record.error["type"] == "model_unavailable"
        assert "'owner/hub-model'" in record.error["message"] and "GET /v1/models" in record.error["message"]
    assert world.redis.llen(world.queue("owner/hub-model").key) == 0
    assert world.redis.llen(world.queue("owner/hub-model", batch=True).key) == 0
    events = [OutboxEvent.from_entry(fields) for _, fields in world.redis.xrange(OUTBOX)]
    assert sorted((event.type, event.id) for event in events) == sorted(
        [("generation.failed", waiting), ("generation.failed", item)]
    )
    assert world.sweep(accepted=("tiny",)) == set()  # nothing twice


@pytest.mark.parametrize("state", ["ready", "loading"])
def test_a_worker_ready_or_loading_keeps_jobs_waiting_however_long(world: Fleet, state: str) -> None:
    job_id = world.submit("gone", waited=timedelta(hours=2))
    announce = fleet.announce if state == "ready" else fleet.announce_loading
    announce(world.redis, "gone", "w1", ttl_s=20)
    assert world.sweep() == set()
    assert world.status(job_id) is JobStatus.QUEUED
    # Once the worker's announcement lapses (it died, or failed to load): the job fails.
    later = utcnow() + timedelta(seconds=21)
    done = fail_unserved_jobs(world.redis, world.lifecycle, world.settings, now=later)
    assert [stranded.job_id for stranded in done] == [job_id]


def test_an_accepted_model_without_workers_fails_jobs_only_after_the_grace(world: Fleet) -> None:
    young = world.submit("sd-m", waited=GRACE - timedelta(seconds=30))
    old = world.submit("sd-m", waited=GRACE + timedelta(seconds=1))
    assert world.sweep(accepted=("sd-m",)) == {old}
    assert world.status(young) is JobStatus.QUEUED
    record = world.store.get(old)
    assert record is not None and record.error is not None
    assert "'sd-m'" in record.error["message"] and "DARKROOM_UNSERVED_AFTER" in record.error["message"]


def test_another_api_accepting_the_model_counts_as_accepted(world: Fleet) -> None:
    fleet.accept(world.redis, ["sd-m"], ttl_s=20)
    young = world.submit("sd-m")
    assert world.sweep(accepted=("tiny",)) == set()
    assert world.status(young) is JobStatus.QUEUED


def test_the_grace_counts_from_the_last_ready_worker(world: Fleet) -> None:
    """A fleet scaled down a minute ago: old jobs still get the whole grace from then."""
    job_id = world.submit("sd-m", waited=timedelta(hours=1))
    fleet.announce(world.redis, "sd-m", "w1", ttl_s=20, now=time.time() - 60)
    assert world.sweep(accepted=("sd-m",)) == set()
    fleet.announce(world.redis, "sd-m", "w1", ttl_s=20, now=time.time() - GRACE.total_seconds() - 60)
    assert world.sweep(accepted=("sd-m",)) == {job_id}


def test_a_zero_grace_turns_the_accepted_rule_off_but_not_the_withdrawn_one(
    redis_client: redis_lib.Redis,
) -> None:
    world = Fleet(redis_client, unserved_after=timedelta(0))
    kept = world.submit("sd-m", waited=timedelta(days=1))
    withdrawn = world.submit("removed")
    assert world.sweep(accepted=("sd-m",)) == {withdrawn}
    assert world.status(kept) is JobStatus.QUEUED


def test_the_default_grace_is_minutes_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DARKROOM_UNSERVED_AFTER", raising=False)
    assert Settings().unserved_after == GRACE
    monkeypatch.setenv("DARKROOM_UNSERVED_AFTER", "90")
    assert Settings().unserved_after == timedelta(seconds=90)
