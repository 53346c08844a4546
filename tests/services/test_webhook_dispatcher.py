"""The outbox dispatcher against a real Redis: every event a transition appended becomes one delivery record
and one first attempt on the webhook queue, whatever dies on the way.

The events come from the real lifecycle; the dispatcher is driven in-process (``drain``, ``run_once``,
``handle``), so each test can stop it exactly where a crash would. ``tests/services/test_webhook_outbox_
faults.py`` does the same with real processes killed by signals.
"""

from __future__ import annotations

import json
import time
import zlib
from datetime import timedelta

from redis import Redis
from rq import Queue
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from schemas.jobs import WebhookDelivery
from services.jobs import JobStore, Lifecycle, utcnow
from services.jobs import outbox as outbox_module
from services.jobs.batches import BatchRecord, BatchStore, new_batch_id
from services.jobs.keys import OUTBOX, OUTBOX_GROUP, batch_key, items_key
from services.jobs.outcome import Succeeded
from services.queue import BATCH_WEBHOOK_TASK, WEBHOOK_TASK
from services.webhooks.dispatcher import OutboxDispatcher
from services.webhooks.scheduling import task_job_id
from tests.fixtures.jobs import queued_job
from tests.fixtures.redis import RedisServerFactory

HOOK = "http://127.0.0.1:9/hook"
TIMEOUT = timedelta(seconds=75)


class Setup:
    def __init__(self, redis: Redis, *, claim_idle: timedelta = timedelta(seconds=30)) -> None:
        self.redis = redis
        self.store = JobStore(redis, timedelta(days=1))
        self.lifecycle = Lifecycle(redis, timedelta(days=1))
        self.queue = Queue("darkroom-webhooks", connection=redis, serializer=JSONSerializer)
        self.claim_idle = claim_idle

    def dispatcher(self, consumer: str = "") -> OutboxDispatcher:
        return OutboxDispatcher(
            redis=self.redis,
            store=self.store,
            queue=self.queue,
            task_timeout=TIMEOUT,
            claim_idle=self.claim_idle,
            consumer=consumer,
            block=timedelta(0),
        )

    def finished_job(self, events: list[str] | None = None) -> str:
        webhook = {"url": HOOK, "events": events or ["completed"]}
        record = queued_job(self.redis, webhook=webhook)
        assert self.lifecycle.claim(record, "worker-a").applied
        assert self.lifecycle.finish(record, "worker-a", Succeeded(images=[])).applied
        return record.id

    def first_attempts(self) -> list[RQJob]:
        return [
            RQJob.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
            for job_id in self.queue.job_ids
        ]


def test_each_event_becomes_a_pending_delivery_and_a_first_attempt(redis_client: Redis) -> None:
    setup = Setup(redis_client)
    job_id = setup.finished_job(["started", "completed"])
    assert setup.dispatcher().drain() == 2
    deliveries = setup.store.deliveries(job_id)
    assert [d["event"] for d in deliveries] == ["generation.started", "generation.succeeded"]
    for delivery in deliveries:
        assert WebhookDelivery.model_validate(delivery).state == "pending" and delivery["attempts"] == []
    jobs = setup.first_attempts()
    assert [job.id for job in jobs] == [task_job_id(d["msg_id"], 1) for d in deliveries]
    for job, delivery in zip(jobs, deliveries, strict=True):
        assert job.func_name == WEBHOOK_TASK and list(job.args) == [job_id, delivery["msg_id"], 1]
        assert job.timeout == int(TIMEOUT.total_seconds())
        # JSON in Redis, never a pickle: decode RQ's stored call data with nothing but zlib and json.
        raw = redis_client.hget(job.key, "data")
        assert isinstance(raw, bytes) and json.loads(zlib.decompress(raw))[0] == WEBHOOK_TASK
    # The event's time is the delivery's (and so the payload's) timestamp.
    record = setup.store.get(job_id)
    assert record is not None and record.completed_at is not None
    assert deliveries[1]["created_at"] == record.completed_at.isoformat()
    # Acknowledged and gone from the stream: nothing pending, nothing left to read.
    assert redis_client.xlen(OUTBOX) == 0
    assert redis_client.xpending(OUTBOX, OUTBOX_GROUP)["pending"] == 0
    assert setup.dispatcher().drain() == 0


def test_handling_an_event_again_schedules_nothing_more(redis_client: Redis) -> None:
    """A dispatcher that died after scheduling but before acknowledging: the next one finds it done."""
    setup = Setup(redis_client)
    job_id = setup.finished_job()
    outbox_module.ensure_group(redis_client)
    [(_, event)] = outbox_module.read_new(redis_client, "first", count=10, block_ms=None)
    assert event is not None and event.subject == "job" and event.id == job_id
    dispatcher = setup.dispatcher()
    assert dispatcher.handle(event) == "scheduled"
    assert dispatcher.handle(event) == "already_scheduled"
    # Also once the attempt ran and its RQ job expired: the delivery record says it is under way.
    redis_client.delete(RQJob.key_for(task_job_id(event.msg_id, 1)))
    delivery = setup.store.get_delivery(job_id, event.msg_id)
    assert delivery is not None
    setup.store.put_delivery(job_id, event.msg_id, {**delivery, "state": "delivered", "attempts": [{}]})
    assert dispatcher.handle(event) == "already_scheduled"
    assert len(setup.store.deliveries(job_id)) == 1 and setup.queue.count == 1


def test_what_a_dead_consumer_read_is_claimed_by_another_after_claim_idle(redis_client: Redis) -> None:
    setup = Setup(redis_client, claim_idle=timedelta(milliseconds=200))
    job_ids = [setup.finished_job() for _ in range(3)]
    outbox_module.ensure_group(redis_client)
    taken = outbox_module.read_new(redis_client, "dead-consumer", count=10, block_ms=None)
    assert len(taken) == 3  # read, then the process died: pending under its name
    survivor = setup.dispatcher("survivor")
    assert survivor.run_once() == 0  # too fresh to claim: the first consumer may only be slow
    survivor._next_claim = 0.0
    pending = redis_client.xpending(OUTBOX, OUTBOX_GROUP)
    assert pending["pending"] == 3
    time.sleep(0.25)
    assert survivor.run_once() == 3
    assert [len(setup.store.deliveries(job_id)) for job_id in job_ids] == [1, 1, 1]
    assert setup.queue.count == 3
    assert redis_client.xpending(OUTBOX, OUTBOX_GROUP)["pending"] == 0 and redis_client.xlen(OUTBOX) == 0
    # The dead consumer holds nothing now; it is forgotten once idle long enough, and a clean stop leaves.
    assert outbox_module.forget_idle_consumers(redis_client, idle_ms=0) >= 1
    names = {c["name"] for c in redis_client.xinfo_consumers(OUTBOX, OUTBOX_GROUP)}
    assert "dead-consumer" not in {n.decode() if isinstance(n, bytes) else n for n in names}


def test_events_of_expired_jobs_and_unreadable_entries_are_dropped(redis_client: Redis) -> None:
    setup = Setup(redis_client)
    job_id = setup.finished_job()
    redis_client.delete(f"darkroom:job:{job_id}")
    redis_client.xadd(OUTBOX, {"something": "else"})
    assert setup.dispatcher().drain() == 2
    assert setup.queue.count == 0 and redis_client.xlen(OUTBOX) == 0


def test_after_410_gone_later_events_of_the_job_are_dropped(redis_client: Redis) -> None:
    setup = Setup(redis_client)
    record = queued_job(redis_client, webhook={"url": HOOK, "events": ["started", "completed"]})
    assert setup.lifecycle.claim(record, "worker-a").applied
    setup.dispatcher().drain()
    [started] = setup.store.deliveries(record.id)
    setup.store.put_delivery(record.id, started["msg_id"], {**started, "state": "gone"})  # the receiver's 410
    assert setup.lifecycle.finish(record, "worker-a", Succeeded(images=[])).applied
    assert setup.dispatcher().drain() == 1
    assert len(setup.store.deliveries(record.id)) == 1 and setup.queue.count == 1


def test_a_batch_completed_event_is_delivered_on_the_batch(redis_client: Redis) -> None:
    setup = Setup(redis_client)
    batch = BatchRecord(
        id=new_batch_id(),
        owner="anonymous",
        created_at=utcnow(),
        total=1,
        retention_s=3600,
        webhook={"url": HOOK, "events": ["batch.completed"]},
    )
    redis_client.hset(batch_key(batch.id), mapping=batch.creation_fields())  # type: ignore[arg-type]
    item = queued_job(redis_client, batch_id=batch.id)
    redis_client.rpush(items_key(batch.id), item.id)
    assert setup.lifecycle.cancel_queued(item.id, "canceled").batch_done == batch.id
    assert setup.dispatcher().drain() == 1
    [delivery] = BatchStore(redis_client).deliveries(batch.id)
    assert delivery["event"] == "batch.completed"
    [job] = setup.first_attempts()
    assert job.func_name == BATCH_WEBHOOK_TASK and list(job.args) == [batch.id, delivery["msg_id"], 1]


def test_an_outbox_survives_a_redis_restart(fresh_redis_server: RedisServerFactory) -> None:
    """AOF on, as shipped: events appended before a restart — read or not — are delivered after it."""
    server = fresh_redis_server()
    redis = Redis.from_url(server.url)
    setup = Setup(redis, claim_idle=timedelta(milliseconds=1))
    job_ids = [setup.finished_job() for _ in range(4)]
    outbox_module.ensure_group(redis)
    outbox_module.read_new(redis, "dead-consumer", count=2, block_ms=None)  # two read, never acknowledged
    server.stop()  # SIGTERM: Redis writes its AOF out and exits
    server.restart()
    redis = Redis.from_url(server.url)
    setup = Setup(redis, claim_idle=timedelta(milliseconds=1))
    assert redis.xlen(OUTBOX) == 4 and redis.xpending(OUTBOX, OUTBOX_GROUP)["pending"] == 2
    assert setup.dispatcher().drain() == 4
    assert [len(setup.store.deliveries(job_id)) for job_id in job_ids] == [1, 1, 1, 1]
    assert setup.queue.count == 4
    redis.close()


def test_the_dispatcher_thread_feeds_the_queue_and_leaves_the_group_on_stop(redis_client: Redis) -> None:
    setup = Setup(redis_client)
    setup.finished_job()
    dispatcher = setup.dispatcher("leaving")
    dispatcher.block = timedelta(milliseconds=50)
    dispatcher.start()
    try:
        deadline = time.monotonic() + 10
        while setup.queue.count == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        dispatcher.stop()
    assert setup.queue.count == 1
    names = [c["name"] for c in redis_client.xinfo_consumers(OUTBOX, OUTBOX_GROUP)]
    assert "leaving" not in {n.decode() if isinstance(n, bytes) else n for n in names}
