"""A queued job's place in line from its queue's order counters (no LPOS), and the Retry-After hint."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar, cast

import redis as redis_lib
import redis.asyncio as aredis
from rq import Queue

from schemas.jobs import Job, JobStatus, Progress
from services import queue_order, rq_records
from services.admission import Admitter, BatchAdmitter
from services.jobs import JobRecord, JobStore, Lifecycle, new_job_id, utcnow
from services.jobs.batches import BatchRecord, new_batch_id
from services.jobs.keys import queue_order_key
from services.queue import batch_queue, generation_queue
from services.settings import Settings
from tests.fixtures.jobs import REQUEST

T = TypeVar("T")
SETTINGS = Settings(auth_disabled=True, queue_share_per_key=1)


def _run(redis_url: str, body: Callable[[aredis.Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        client = aredis.Redis.from_url(redis_url)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


class Line:
    """One generation queue on a real Redis: admit through the real script, claim and cancel through the
    real lifecycle, read positions as the API does."""

    def __init__(self, redis_url: str) -> None:
        self.url = redis_url
        self.redis = redis_lib.Redis.from_url(redis_url)
        self.queue: Queue = generation_queue(self.redis, SETTINGS)
        self.store = JobStore(self.redis, timedelta(days=1))
        self.lifecycle = Lifecycle(self.redis, timedelta(days=1))

    def admit(self, n: int) -> list[str]:
        records = [
            JobRecord(id=new_job_id(), status=JobStatus.QUEUED, created_at=utcnow(), request=REQUEST)
            for _ in range(n)
        ]

        async def body(client: aredis.Redis) -> None:
            admitter = Admitter(client, self.queue, SETTINGS, None)
            for record in records:
                assert (await admitter.admit(record, "alice")).outcome == "queued"

        _run(self.url, body)
        return [record.id for record in records]

    def record(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        assert record is not None
        return record

    def positions(self, job_ids: list[str]) -> list[int | None]:
        async def body(client: aredis.Redis) -> list[int | None]:
            found: list[int | None] = []
            for job_id in job_ids:
                record = self.record(job_id)
                if record.status is not JobStatus.QUEUED:
                    found.append(None)
                    continue
                assert record.queue_seq is not None and record.queue_order is not None
                order = await queue_order.read_order_async(client, record.queue_order)
                found.append(order.position(record.queue_seq))
            return found

        return _run(self.url, body)

    def claim_next(self) -> str:
        """What a worker does: RQ pops the head of the list, then the lifecycle claims it."""
        job_id = cast(bytes, self.redis.lpop(self.queue.key)).decode()
        assert self.lifecycle.claim(self.record(job_id), "darkroom-w-1").applied
        return job_id


def test_the_position_counts_down_as_jobs_are_claimed(redis_url: str) -> None:
    line = Line(redis_url)
    jobs = line.admit(4)
    assert line.positions(jobs) == [1, 2, 3, 4]
    assert line.claim_next() == jobs[0]
    assert line.positions(jobs) == [None, 1, 2, 3]
    line.claim_next()
    line.claim_next()
    assert line.positions(jobs) == [None, None, None, 1]
    more = line.admit(2)  # behind what is left
    assert line.positions(more) == [2, 3]
    # Exactly what LPOS says, while jobs leave in order.
    assert [rq_records.queue_position(line.redis, line.queue, job_id) for job_id in more] == [2, 3]


def test_a_canceled_job_ahead_still_counts_until_a_job_behind_it_is_claimed(redis_url: str) -> None:
    """Documented: too high by the canceled jobs ahead, until the claims pass them."""
    line = Line(redis_url)
    jobs = line.admit(4)
    queue = line.queue
    assert line.lifecycle.cancel(jobs[1], "x", rq=rq_records.remove_from_queue(queue)) is JobStatus.QUEUED
    assert line.positions([jobs[2], jobs[3]]) == [3, 4]  # LPOS would say 2, 3
    line.claim_next()  # jobs[0]
    assert line.positions([jobs[2], jobs[3]]) == [2, 3]
    assert line.claim_next() == jobs[2]  # the claim passes the canceled job: the estimate is exact again
    assert line.positions([jobs[3]]) == [1]


def test_a_requeued_job_is_next_and_is_not_counted_by_those_behind_it(redis_url: str) -> None:
    """Documented: a lost job goes back to the front with position 1; those behind it read one too few."""
    line = Line(redis_url)
    jobs = line.admit(3)
    lost = line.claim_next()
    done = line.lifecycle.requeue(
        line.record(lost),
        guard=("worker", "darkroom-w-1"),
        rq=rq_records.requeued_at_front(line.redis, line.queue, lost),
    )
    assert done.applied
    assert line.positions([lost, jobs[1], jobs[2]]) == [1, 1, 2]  # LPOS: 1, 2, 3
    assert line.claim_next() == lost
    assert line.positions([jobs[1], jobs[2]]) == [1, 2]  # exact again


def test_a_batchs_items_take_consecutive_places(redis_url: str) -> None:
    redis = redis_lib.Redis.from_url(redis_url)
    queue = batch_queue(redis, SETTINGS)
    batch = BatchRecord(id=new_batch_id(), owner="alice", created_at=utcnow(), total=3, retention_s=3600)
    items = [
        JobRecord(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            created_at=batch.created_at,
            request=REQUEST,
            owner="alice",
            batch_id=batch.id,
        )
        for _ in range(3)
    ]

    async def body(client: aredis.Redis) -> None:
        admitter = BatchAdmitter(client, queue, SETTINGS, None)
        assert (await admitter.admit(batch, items, "alice")).outcome == "queued"

    _run(redis_url, body)
    store = JobStore(redis, timedelta(days=1))
    seqs = [cast(JobRecord, store.get(item.id)).queue_seq for item in items]
    assert seqs == [1, 2, 3]
    assert {cast(JobRecord, store.get(item.id)).queue_order for item in items} == {queue_order_key(queue.key)}


def test_claims_record_the_queues_pace(redis_url: str) -> None:
    line = Line(redis_url)
    line.admit(3)
    line.claim_next()
    order_key = queue_order_key(line.queue.key)
    assert line.redis.hget(order_key, "gap_ms") is None  # one claim: no gap yet
    line.claim_next()
    gap = line.redis.hget(order_key, "gap_ms")
    assert gap is not None and 0 <= float(gap) <= 60_000
    assert int(cast(bytes, line.redis.hget(order_key, "claimed"))) == 2


def test_the_queued_hint_scales_with_the_wait_within_bounds() -> None:
    assert queue_order.queued_retry_after(1, None) == queue_order.DEFAULT_POLL_S
    assert queue_order.queued_retry_after(1, 5.0) == queue_order.MIN_POLL_S  # 5 ms: poll again soon
    assert queue_order.queued_retry_after(10, 1_000.0) == 10
    assert queue_order.queued_retry_after(100_000, 1_000.0) == queue_order.MAX_POLL_S


NOW = utcnow()


def _running(step: int, total: int, started_s_ago: float) -> Job:
    return Job.model_construct(
        id="gen_x",
        status=JobStatus.RUNNING,
        progress=Progress(step=step, total=total) if step else None,
        created_at=NOW,
        started_at=NOW - timedelta(seconds=started_s_ago),
    )


def test_the_running_hint_is_the_remaining_steps_at_the_pace_so_far() -> None:
    def hint(step: int, total: int, started_s_ago: float) -> int:
        return queue_order.running_retry_after(_running(step, total, started_s_ago), NOW)

    assert hint(0, 0, 10) == queue_order.DEFAULT_POLL_S
    assert hint(10, 20, 3) == 3  # 10 more steps at 0.3 s
    assert hint(1, 100, 60) == queue_order.MAX_RUNNING_POLL_S
    assert hint(99, 100, 1) == queue_order.MIN_POLL_S
    finished = _running(100, 100, 1).model_copy(update={"status": JobStatus.SUCCEEDED})
    assert queue_order.retry_after(finished, 1000.0) is None
