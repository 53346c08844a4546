"""The admission script: replays, the queue ceiling, the token bucket and the enqueue, decided atomically."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import redis as redis_lib
import redis.asyncio as aredis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from schemas.jobs import JobStatus
from services.admission import Admission, Admitter, BatchAdmitter, IdempotencyClaim, StagingLost
from services.jobs import JobRecord, JobStore, Lifecycle, new_job_id, utcnow
from services.jobs.batches import BatchRecord, new_batch_id
from services.queue import batch_queue, generation_queue
from services.rate_limit import RateLimit, retry_after_s
from services.rq_records import GENERATION_TASK
from services.settings import Settings

T = TypeVar("T")
REQUEST = {"prompt": "a red fox", "width": 512, "height": 512, "seed": 7}


def _record() -> JobRecord:
    return JobRecord(
        id=new_job_id(), status=JobStatus.QUEUED, created_at=utcnow(), request=REQUEST, owner="alice"
    )


def _run(redis_url: str, body: Callable[[aredis.Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        client = aredis.Redis.from_url(redis_url)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def _admitter(
    client: aredis.Redis, redis_url: str, *, max_queue_depth: int = 1000, rate: RateLimit | None = None
) -> tuple[Admitter, Queue]:
    settings = Settings(auth_disabled=True, max_queue_depth=max_queue_depth, queue_share_per_key=1)
    queue = generation_queue(redis_lib.Redis.from_url(redis_url), settings)
    return Admitter(client, queue, settings, rate), queue


def _claim(job_id: str, fingerprint: str = "f1") -> IdempotencyClaim:
    return IdempotencyClaim(
        key="darkroom:idempotency:k1",
        created={"job_id": job_id},
        fingerprint=fingerprint,
        ttl=timedelta(hours=1),
    )


def test_an_admitted_job_is_recorded_and_queued_exactly_as_rq_would_enqueue_it(redis_url: str) -> None:
    records = [_record(), _record()]

    async def body(client: aredis.Redis) -> tuple[list[Admission], Queue]:
        admitter, queue = _admitter(client, redis_url)
        return [await admitter.admit(record, "alice") for record in records], queue

    admissions, queue = _run(redis_url, body)
    assert [(a.outcome, a.value) for a in admissions] == [("queued", 1), ("queued", 2)]
    store = JobStore(redis_lib.Redis.from_url(redis_url), timedelta(days=1))
    stored = store.get(records[0].id)
    assert stored is not None and stored.status is JobStatus.QUEUED and stored.owner == "alice"
    assert stored.request == REQUEST and stored.created_at == records[0].created_at
    assert [event["data"]["status"] for _, event in store.events_since(records[0].id)] == ["queued"]
    retention_s = Settings(auth_disabled=True).job_retention.total_seconds()
    assert retention_s - 5 < store.redis.ttl(f"darkroom:job:{records[0].id}") <= retention_s
    assert queue.job_ids == [record.id for record in records]
    rq_job = Job.fetch(records[0].id, connection=queue.connection, serializer=JSONSerializer)
    assert rq_job.func_name == GENERATION_TASK and list(rq_job.args) == [records[0].id]
    assert rq_job.get_status() == "queued" and rq_job.origin == queue.name
    assert rq_job.timeout == 600 and rq_job.enqueued_at is not None
    # What a worker dequeues is this job, whole.
    dequeued = Queue.dequeue_any([queue], None, connection=queue.connection, serializer=JSONSerializer)
    assert (
        dequeued is not None and dequeued[0].id == records[0].id and list(dequeued[0].args) == [records[0].id]
    )


def test_a_used_idempotency_key_returns_the_first_job_and_writes_nothing(redis_url: str) -> None:
    first, second = _record(), _record()

    async def body(client: aredis.Redis) -> tuple[Admission, Admission, Queue]:
        admitter, queue = _admitter(client, redis_url)
        a = await admitter.admit(first, "alice", _claim(first.id))
        b = await admitter.admit(second, "alice", _claim(second.id, fingerprint="f2"))
        return a, b, queue

    a, b, queue = _run(redis_url, body)
    assert a.outcome == "queued"
    assert b.outcome == "replay" and b.existing == {"job_id": first.id, "fingerprint": "f1"}
    assert queue.job_ids == [first.id]
    assert not queue.connection.exists(f"darkroom:job:{second.id}", f"rq:job:{second.id}")


def test_the_queue_ceiling_is_hard_under_concurrent_submissions(redis_url: str) -> None:
    records = [_record() for _ in range(40)]

    async def body(client: aredis.Redis) -> tuple[list[Admission], Queue]:
        admitter, queue = _admitter(client, redis_url, max_queue_depth=7)
        return list(await asyncio.gather(*(admitter.admit(r, "alice") for r in records))), queue

    admissions, queue = _run(redis_url, body)
    queued = [r.id for r, a in zip(records, admissions, strict=True) if a.outcome == "queued"]
    assert len(queued) == 7 and sorted(queue.job_ids) == sorted(queued)
    refused = [a for a in admissions if a.outcome != "queued"]
    assert {a.outcome for a in refused} == {"queue_full"} and {a.value for a in refused} == {7}
    for record, admission in zip(records, admissions, strict=True):  # refused: no trace left
        if admission.outcome == "queue_full":
            assert not queue.connection.exists(f"darkroom:job:{record.id}", f"rq:job:{record.id}")


def test_the_token_bucket_refuses_past_its_burst_and_buckets_are_per_key(redis_url: str) -> None:
    rate = RateLimit(per_minute=60, burst=5)

    async def body(client: aredis.Redis) -> tuple[list[Admission], Admission]:
        admitter, _ = _admitter(client, redis_url, rate=rate)
        alice = [await admitter.admit(_record(), "alice") for _ in range(6)]
        return alice, await admitter.admit(_record(), "bob")

    alice, bob = _run(redis_url, body)
    assert [a.outcome for a in alice] == ["queued"] * 5 + ["rate_limited"]
    assert 0 < alice[-1].value <= 1000 and retry_after_s(alice[-1].value) == 1  # one token a second
    assert bob.outcome == "queued"


def test_concurrent_submissions_cannot_overspend_the_bucket(redis_url: str) -> None:
    rate = RateLimit(per_minute=1, burst=20)

    async def body(client: aredis.Redis) -> list[Admission]:
        admitter, _ = _admitter(client, redis_url, rate=rate)
        return list(await asyncio.gather(*(admitter.admit(_record(), "shared") for _ in range(60))))

    outcomes = [a.outcome for a in _run(redis_url, body)]
    assert outcomes.count("queued") == 20 and outcomes.count("rate_limited") == 40


def test_a_submission_refused_at_the_ceiling_spends_no_token(redis_url: str) -> None:
    rate = RateLimit(per_minute=1, burst=2)

    async def body(client: aredis.Redis) -> list[str]:
        full, queue = _admitter(client, redis_url, max_queue_depth=1, rate=rate)
        outcomes = [(await full.admit(_record(), "alice")).outcome for _ in range(4)]
        drained = [queue.key, *queue.connection.keys("darkroom:queued-of:*")]  # as a worker's claims do
        queue.connection.delete(*drained)  # a worker drained the queue
        outcomes.append((await full.admit(_record(), "alice")).outcome)
        queue.connection.delete(*drained)
        outcomes.append((await full.admit(_record(), "alice")).outcome)
        return outcomes

    # 1 queued, 3 refused at the ceiling (no token spent), the second token, then the bucket is empty.
    expected = ["queued", "queue_full", "queue_full", "queue_full", "queued", "rate_limited"]
    assert _run(redis_url, body) == expected


def test_tokens_refill_over_time(redis_url: str) -> None:
    rate = RateLimit(per_minute=60_000, burst=1)  # one token per millisecond

    async def body(client: aredis.Redis) -> list[str]:
        admitter, _ = _admitter(client, redis_url, rate=rate)
        outcomes = [(await admitter.admit(_record(), "k")).outcome]
        await asyncio.sleep(0.01)
        outcomes.append((await admitter.admit(_record(), "k")).outcome)
        return outcomes

    assert _run(redis_url, body) == ["queued", "queued"]


def test_rate_limits_must_be_positive() -> None:
    for per_minute, burst in ((0, 5), (60, 0), (-1, 1)):
        try:
            RateLimit(per_minute=per_minute, burst=burst)
        except ValueError:
            continue
        raise AssertionError(f"RateLimit({per_minute}, {burst}) was accepted")


# --- batches ---------------------------------------------------------------------------------------------


def _batch(n: int) -> tuple[BatchRecord, list[JobRecord]]:
    batch = BatchRecord(
        id=new_batch_id(), owner="alice", created_at=utcnow(), total=n, retention_s=3600, webhook=None
    )
    items = [
        JobRecord(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            created_at=batch.created_at,
            request={**REQUEST, "seed": i},
            owner="alice",
            batch_id=batch.id,
        )
        for i in range(n)
    ]
    return batch, items


def test_a_batch_is_admitted_whole_or_not_at_all_with_one_token_and_replays(redis_url: str) -> None:
    (first, first_items), (second, second_items), (third, third_items) = _batch(3), _batch(3), _batch(2)
    settings = Settings(auth_disabled=True, max_batch_queue_depth=5, queue_share_per_key=1)
    queue = batch_queue(redis_lib.Redis.from_url(redis_url), settings)
    rate = RateLimit(per_minute=60, burst=2)

    def claim(batch: BatchRecord, fingerprint: str) -> IdempotencyClaim:
        key = "darkroom:idempotency:batch:k"
        return IdempotencyClaim(key, {"batch_id": batch.id}, fingerprint, timedelta(hours=1))

    async def body(client: aredis.Redis) -> list[Admission]:
        admitter = BatchAdmitter(client, queue, settings, rate)
        return [
            await admitter.admit(first, first_items, "alice", claim(first, "f1"), cost=1),
            await admitter.admit(second, second_items, "alice", cost=1),  # 3 + 3 > 5: refused whole
            await admitter.admit(third, third_items, "alice", claim(third, "f1"), cost=1),  # the key's batch
            await admitter.admit(third, third_items, "alice", cost=1),  # fits; the second token of the burst
        ]

    admissions = _run(redis_url, body)
    assert [(a.outcome, a.value) for a in admissions] == [
        ("queued", 3),
        ("queue_full", 3),
        ("replay", 0),
        ("queued", 5),
    ]
    assert admissions[2].existing == {"batch_id": first.id, "fingerprint": "f1"}
    assert queue.job_ids == [item.id for item in first_items + third_items]
    connection = queue.connection
    assert not connection.exists(
        f"darkroom:batch:{second.id}", *(f"darkroom:job:{i.id}" for i in second_items)
    )
    assert [raw.decode() for raw in connection.lrange(f"darkroom:batch:{first.id}:items", 0, -1)] == [
        item.id for item in first_items
    ]
    store = JobStore(connection, timedelta(days=1))
    stored = store.get(first_items[1].id)
    assert stored is not None and stored.batch_id == first.id and stored.request["seed"] == 1
    assert [event["data"]["status"] for _, event in store.events_since(first_items[1].id)] == ["queued"]
    rq_job = Job.fetch(first_items[0].id, connection=connection, serializer=JSONSerializer)
    assert rq_job.origin == queue.name and list(rq_job.args) == [first_items[0].id]
    # Items count into their batch as they end; the transition that ends the last one says so, once.
    lifecycle = Lifecycle(connection, timedelta(days=1))
    outcomes = [lifecycle.cancel_queued(i.id, "canceled") for i in third_items]
    assert [o.batch_done for o in outcomes] == [None, third.id]
    assert connection.hget(f"darkroom:batch:{third.id}", "completed_at") is not None
    again = lifecycle.cancel_queued(third_items[1].id, "canceled")
    assert not again.applied and again.batch_done is None


# --- the largest batch allowed (issue #16, case 4): how long it holds Redis, and all or nothing ------------

#: Just under DARKROOM_MAX_BATCH_STORED_BYTES (8 MiB): 1,000 items of 1,969 emoji (7,876 bytes as UTF-8).
BIG_PROMPT = "\U0001f600" * 1969


def _big_batch(n: int = 1000) -> tuple[BatchRecord, list[JobRecord]]:
    batch, items = _batch(n)
    for item in items:
        item.request["prompt"] = BIG_PROMPT
    return batch, items


def test_the_largest_batch_allowed_never_holds_redis_for_long(redis_url: str) -> None:
    """One script writing 8 MB of items held every other client for ~100 ms; staged, the script only
    renames and queues (~10 ms here). Measured as Redis measures itself: the longest command in SLOWLOG
    while the batch is admitted (a PING loop beside it says the same, with the machine's noise added)."""
    batch, items = _big_batch()
    settings = Settings(auth_disabled=True, queue_share_per_key=1)
    connection = redis_lib.Redis.from_url(redis_url)
    connection.flushdb()
    queue = batch_queue(connection, settings)
    connection.config_set("slowlog-log-slower-than", 0)
    connection.config_set("slowlog-max-len", 100_000)
    connection.slowlog_reset()
    connection.execute_command("MEMORY", "PURGE")
    before = int(connection.info("memory")["used_memory"])
    try:
        admission = _run(
            redis_url,
            lambda client: BatchAdmitter(client, queue, settings, None).admit(batch, items, "alice"),
        )
        longest = max(entry["duration"] for entry in connection.slowlog_get(100_000)) / 1000
    finally:
        connection.config_set("slowlog-log-slower-than", 10_000)
    assert admission.outcome == "queued" and len(queue.job_ids) == 1000
    print(f"\nlargest batch (1,000 × 7,876-byte prompts): longest Redis command {longest:.1f} ms")
    assert longest < 50, f"admission held Redis for {longest:.1f} ms"
    # Per item: the request (8,058 bytes of JSON) in the job hash, plus the event stream (1.2 KB with
    # the shipped stream-node-max-bytes 1024; 4.3 KB at Redis's default), RQ's hash (1.9 KB), list and
    # share entries. 15.6 KB before; ~12.5 KB now.
    connection.slowlog_reset()
    connection.execute_command("MEMORY", "PURGE")
    per_item = (int(connection.info("memory")["used_memory"]) - before) / 1000
    print(f"Redis bytes per item {per_item:.0f}")
    assert per_item < 8058 + 5000
    assert not connection.keys("darkroom:staging:*")
    stored = JobStore(connection, timedelta(days=1)).get(items[-1].id)
    assert stored is not None and stored.request["prompt"] == BIG_PROMPT
    assert connection.ttl(f"darkroom:job:{items[-1].id}") > 3000
    assert connection.ttl(f"darkroom:job:{items[-1].id}:events") > 3000
    assert connection.ttl(f"rq:job:{items[-1].id}") == -1  # as Queue.enqueue leaves it


def test_a_refused_big_batch_leaves_nothing_behind(redis_url: str) -> None:
    """Refused after its items were staged (the token bucket says no): no record, no event stream, no RQ
    job, nothing queued, no share held, no staging left; and a batch whose staging expired before the
    script ran is not admitted either."""
    connection = redis_lib.Redis.from_url(redis_url)
    connection.flushdb()
    settings = Settings(auth_disabled=True, queue_share_per_key=1)
    queue = batch_queue(connection, settings)
    batch, items = _big_batch(200)
    lost, lost_items = _batch(3)

    async def body(client: aredis.Redis) -> Admission:
        refused = await BatchAdmitter(client, queue, settings, RateLimit(per_minute=60, burst=10)).admit(
            batch, items, "alice", cost=11
        )
        admitter = BatchAdmitter(client, queue, settings, None)
        stage = admitter._stage

        async def stage_then_expire(
            prefix: str, batch: BatchRecord, items: list[JobRecord], share_key: str
        ) -> None:
            await stage(prefix, batch, items, share_key)
            await client.delete(f"{prefix}{lost_items[1].id}:rq")  # as if its TTL ran out

        admitter._stage = stage_then_expire  # type: ignore[method-assign]
        try:
            await admitter.admit(lost, lost_items, "alice")
        except StagingLost:
            pass
        else:
            raise AssertionError("a batch with expired staging was admitted")
        return refused

    refused = _run(redis_url, body)
    assert refused.outcome == "rate_limited"
    every = [i.id for i in items + lost_items]
    assert not connection.exists(
        *(f"darkroom:job:{i}" for i in every),
        *(f"darkroom:job:{i}:events" for i in every),
        *(f"rq:job:{i}" for i in every),
        f"darkroom:batch:{batch.id}",
        f"darkroom:batch:{lost.id}",
    )
    assert queue.job_ids == [] and not connection.keys("darkroom:staging:*")
    assert not connection.keys("darkroom:queued-of:*") or not connection.zcard(
        connection.keys("darkroom:queued-of:*")[0]
    )
