"""Every transition, made by every actor, against a real Redis: the status it leaves and the events it
appends to the outbox — exactly one terminal event per job, exactly one ``batch.completed`` per batch.

Actors: the worker (claim, progress, finish), the API (cancel while queued, cancel while running, fail a job
stranded on a model nobody serves), lost-job recovery (requeue, fail as lost) and expiry (the record's
retention ran out under it). Each scenario is a sequence of steps on one job; the outbox is then read
back and compared, event by event.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
import redis as redis_lib
from prometheus_client import REGISTRY
from rq import Queue
from rq.serializers import JSONSerializer

from schemas.jobs import JobErrorCode, JobStatus
from schemas.webhooks import GENERATION_EVENTS, TERMINAL_EVENTS
from services import rq_records
from services.jobs import JobRecord, JobStore, Lifecycle, job_key, new_job_id, utcnow
from services.jobs.batches import BatchRecord, BatchStore, new_batch_id
from services.jobs.keys import OUTBOX, RUNNING_SET, batch_key, items_key
from services.jobs.outbox import OutboxEvent
from services.jobs.outcome import Canceled, Failed, Succeeded
from services.jobs.recovery import recover_lost_jobs
from tests.fixtures.jobs import lifecycle_record, queued_job

WORKER = "worker-a"
LOST_AFTER = timedelta(seconds=20)
ALL = [event.value for event in GENERATION_EVENTS]
END = [event.value for event in TERMINAL_EVENTS]
#: As records queued before the vocabulary was unified hold them: the Lua check still honours them.
LEGACY = ["started", "progress", "completed"]


class World:
    """A real Redis, its RQ queue and the lifecycle, with one step function per actor's action."""

    def __init__(self, redis: redis_lib.Redis) -> None:
        self.redis = redis
        self.lifecycle = Lifecycle(redis, timedelta(days=1))
        self.store = JobStore(redis, timedelta(days=1))
        self.queue = Queue("darkroom:test", connection=redis, serializer=JSONSerializer)

    def record(self, job_id: str) -> JobRecord:
        return lifecycle_record(self.redis, job_id)

    def outbox(self) -> list[OutboxEvent]:
        return [OutboxEvent.from_entry(fields) for _, fields in self.redis.xrange(OUTBOX)]

    # --- the actors' actions -------------------------------------------------------------------------------

    def claim(self, job_id: str) -> None:
        """As the worker does: RQ dequeued the id, the claim reads the record (one whose record is gone is
        "missing": nothing changes)."""
        self.redis.lrem(self.queue.key, 0, job_id)
        self.lifecycle.claim(job_id, WORKER)

    def progress(self, job_id: str) -> None:
        self.lifecycle.progress(job_id, WORKER, 1, 2, notify=True)

    def succeed(self, job_id: str) -> None:
        self.lifecycle.finish(self.record(job_id), WORKER, Succeeded(images=[]))

    def fail(self, job_id: str) -> None:
        self.lifecycle.finish(self.record(job_id), WORKER, Failed(JobErrorCode.OUT_OF_MEMORY, "oom"))

    def stop_canceled(self, job_id: str) -> None:
        """The worker saw the cancel request between two steps."""
        assert self.lifecycle.cancel_requested(job_id)
        self.lifecycle.finish(self.record(job_id), WORKER, Canceled("canceled after step 1"))

    def cancel(self, job_id: str) -> None:
        self.lifecycle.cancel(job_id, "canceled", rq=rq_records.remove_from_queue(self.queue))

    def lose(self, job_id: str) -> None:
        """The worker died: recovery's next pass, once the heartbeat is older than ``lost_after``."""
        later = utcnow() + LOST_AFTER + timedelta(seconds=1)
        recover_lost_jobs(
            self.store, self.lifecycle, self.queue, lost_after=LOST_AFTER, max_attempts=2, now=later
        )

    def expire(self, job_id: str) -> None:
        self.redis.delete(job_key(job_id))

    def strand(self, job_id: str) -> None:
        """The API's sweep: nobody serves the job's model (services/jobs/unserved.py)."""
        self.lifecycle.fail_unserved(job_id, "no worker", rq=rq_records.remove_from_queue(self.queue))


Step = Callable[[World, str], None]
claim, progress, succeed, fail = World.claim, World.progress, World.succeed, World.fail
stop_canceled, cancel, lose, expire = World.stop_canceled, World.cancel, World.lose, World.expire
strand = World.strand

SCENARIOS: list[tuple[str, list[str] | None, list[Step], JobStatus | None, list[str]]] = [
    # name, webhook subscriptions (None: no webhook), steps, final status (None: gone), outbox event types
    (
        "worker succeeds",
        ALL,
        [claim, progress, succeed],
        JobStatus.SUCCEEDED,
        ["generation.started", "generation.progress", "generation.succeeded"],
    ),
    ("worker fails", END, [claim, progress, fail], JobStatus.FAILED, ["generation.failed"]),
    ("no webhook: nothing in the outbox", None, [claim, progress, succeed], JobStatus.SUCCEEDED, []),
    (
        "only started asked for",
        ["generation.started"],
        [claim, succeed],
        JobStatus.SUCCEEDED,
        ["generation.started"],
    ),
    (
        "only progress asked for",
        ["generation.progress"],
        [claim, progress, progress, succeed],
        JobStatus.SUCCEEDED,
        ["generation.progress", "generation.progress"],
    ),
    ("API cancels while queued", ALL, [cancel], JobStatus.CANCELED, ["generation.canceled"]),
    (
        "API cancels while running, the worker stops",
        ALL,
        [claim, cancel, stop_canceled],
        JobStatus.CANCELED,
        ["generation.started", "generation.canceled"],
    ),
    (
        "a cancel after the end changes nothing",
        END,
        [claim, succeed, cancel],
        JobStatus.SUCCEEDED,
        ["generation.succeeded"],
    ),
    (
        "a second outcome is refused",
        END,
        [claim, succeed, fail],
        JobStatus.SUCCEEDED,
        ["generation.succeeded"],
    ),
    (
        "recovery requeues, the re-run succeeds",
        ALL,
        [claim, lose, claim, succeed],
        JobStatus.SUCCEEDED,
        ["generation.started", "generation.started", "generation.succeeded"],
    ),
    (
        "recovery fails it on its last attempt",
        END,
        [claim, lose, claim, lose],
        JobStatus.FAILED,
        ["generation.failed"],
    ),
    (
        "the lost worker's late outcome is refused",
        END,
        [claim, lose, succeed],
        JobStatus.QUEUED,
        [],
    ),
    (
        "canceled while requeued",
        END,
        [claim, lose, cancel, claim],
        JobStatus.CANCELED,
        ["generation.canceled"],
    ),
    (
        "only failures asked for: a success sends nothing",
        ["generation.failed"],
        [claim, progress, succeed],
        JobStatus.SUCCEEDED,
        [],
    ),
    (
        "a record stored with the old names",
        LEGACY,
        [claim, progress, succeed],
        JobStatus.SUCCEEDED,
        ["generation.started", "generation.progress", "generation.succeeded"],
    ),
    (
        "an old batch item's generation.completed",
        ["generation.completed"],
        [claim, fail],
        JobStatus.FAILED,
        ["generation.failed"],
    ),
    ("stranded while queued: failed, off the queue", ALL, [strand], JobStatus.FAILED, ["generation.failed"]),
    (
        "claimed before the sweep: served after all",
        ALL,
        [claim, strand, succeed],
        JobStatus.SUCCEEDED,
        ["generation.started", "generation.succeeded"],
    ),
    (
        "stranded after a lost run was requeued",
        END,
        [claim, lose, strand, claim],
        JobStatus.FAILED,
        ["generation.failed"],
    ),
    ("a canceled job is not stranded", ALL, [cancel, strand], JobStatus.CANCELED, ["generation.canceled"]),
    ("expired while queued: nobody can claim it", ALL, [expire, claim], None, []),
    ("expired while running: recovery drops it", ALL, [claim, expire, lose], None, ["generation.started"]),
]


@pytest.mark.parametrize(
    ("subscriptions", "steps", "status", "expected"),
    [pytest.param(*scenario[1:], id=scenario[0]) for scenario in SCENARIOS],
)
def test_each_transition_appends_exactly_its_events(
    redis_client: redis_lib.Redis,
    subscriptions: list[str] | None,
    steps: list[Step],
    status: JobStatus | None,
    expected: list[str],
) -> None:
    world = World(redis_client)
    webhook = {"url": "https://receiver.example/hook", "events": subscriptions} if subscriptions else None
    job = queued_job(redis_client, queue=world.queue, webhook=webhook)
    for step in steps:
        step(world, job.id)
    events = world.outbox()
    assert [event.type for event in events] == expected
    assert {(event.subject, event.id) for event in events} <= {("job", job.id)}
    assert len({event.msg_id for event in events}) == len(events)  # each event its own webhook-id
    terminal = [
        event
        for event in events
        if event.type in ("generation.succeeded", "generation.failed", "generation.canceled")
    ]
    assert len(terminal) <= 1
    if status is None:
        assert not redis_client.exists(job_key(job.id))
        return
    record = world.record(job.id)
    assert record.status is status
    running = redis_client.zscore(RUNNING_SET, job_key(job.id)) is not None
    assert bool(running) is (status is JobStatus.RUNNING)
    on_queue = rq_records.queue_position(redis_client, world.queue, job.id) is not None
    assert on_queue is (status is JobStatus.QUEUED)
    if status.is_terminal:
        if subscriptions and (set(END) <= set(subscriptions) or "completed" in subscriptions):
            assert terminal and terminal[0].type == f"generation.{status.value}"
        assert redis_client.ttl(job_key(job.id)) > 0  # retention restarted with the end
    if status is JobStatus.FAILED and strand in steps:
        assert record.error == {"type": "model_unavailable", "message": "no worker"}
    elif status is JobStatus.FAILED and record.attempt == 2:
        assert record.error == {"type": "worker_lost", "message": record.error["message"]}


def test_the_events_stream_records_every_status_in_order(redis_client: redis_lib.Redis) -> None:
    world = World(redis_client)
    job = queued_job(redis_client, queue=world.queue)
    for step in (claim, lose, claim, succeed):
        step(world, job.id)
    statuses = [
        event["data"]["status"] for _, event in world.store.events_since(job.id) if event["type"] == "status"
    ]
    assert statuses == ["queued", "running", "queued", "running", "succeeded"]


BATCH_ENDINGS: list[tuple[str, list[list[Step]]]] = [
    ("the worker ends the last item", [[cancel], [claim, fail], [claim, succeed]]),
    ("the API's cancel ends the last item", [[claim, succeed], [claim, fail], [cancel]]),
    ("recovery ends the last item", [[cancel], [claim, succeed], [claim, lose, claim, lose]]),
    ("a cancel mid-run ends the last item", [[claim, succeed], [cancel], [claim, cancel, stop_canceled]]),
    ("the stranded-job sweep ends the last item", [[claim, succeed], [strand], [strand]]),
]


@pytest.mark.parametrize("per_item", [pytest.param(e[1], id=e[0]) for e in BATCH_ENDINGS])
@pytest.mark.parametrize("item_events", [END, None], ids=["item events", "no item events"])
def test_a_batch_completes_once_whoever_ends_its_last_item(
    redis_client: redis_lib.Redis, per_item: list[list[Step]], item_events: list[str] | None
) -> None:
    world = World(redis_client)
    batch = BatchRecord(
        id=new_batch_id(),
        owner="anonymous",
        created_at=utcnow(),
        total=len(per_item),
        retention_s=3600,
        webhook={"url": "https://receiver.example/hook", "events": ["batch.completed"]},
    )
    redis_client.hset(batch_key(batch.id), mapping=batch.creation_fields())  # type: ignore[arg-type]
    item_hook = {"url": "https://receiver.example/hook", "events": item_events} if item_events else None
    items = [
        queued_job(redis_client, queue=world.queue, webhook=item_hook, batch_id=batch.id) for _ in per_item
    ]
    redis_client.rpush(items_key(batch.id), *[item.id for item in items])
    for item, steps in zip(items, per_item, strict=True):
        for step in steps:
            step(world, item.id)
    events = world.outbox()
    batch_events = [event for event in events if event.subject == "batch"]
    assert [(event.type, event.id) for event in batch_events] == [("batch.completed", batch.id)]
    assert events[-1] == batch_events[0]  # the last item's end, and only it, completed the batch
    item_terminals = [event for event in events if event.subject == "job"]
    assert len(item_terminals) == (len(items) if item_events else 0)
    assert len({event.id for event in item_terminals}) == len(item_terminals)
    stored = BatchStore(redis_client).get(batch.id)
    assert stored is not None and stored.completed_at is not None and stored.done == len(items)


def queue_wait_sum() -> float:
    return REGISTRY.get_sample_value("darkroom_generation_queue_wait_seconds_sum") or 0.0


def test_a_claim_reads_back_the_record_it_left(redis_client: redis_lib.Redis) -> None:
    """The worker reads nothing before it claims: the claim's reply is the record it runs, the cancel
    flag of a request made while it was queued included, and the queue wait counts from its creation."""
    world = World(redis_client)
    job = queued_job(redis_client, queue=world.queue, created_at=utcnow() - timedelta(seconds=3))
    world.redis.hset(job_key(job.id), "cancel_requested", "1")  # asked to stop while queued
    before, at = queue_wait_sum(), utcnow()
    done = world.lifecycle.claim(job.id, WORKER, at=at)
    assert done.applied and done.previous is JobStatus.QUEUED
    assert done.record == world.record(job.id)  # exactly the stored record, as the claim left it
    assert done.record.status is JobStatus.RUNNING and done.record.worker == WORKER
    assert done.record.started_at == done.record.heartbeat_at == at
    assert done.record.request == job.request and done.record.cancel_requested
    assert queue_wait_sum() - before == pytest.approx((at - job.created_at).total_seconds())


def test_a_claim_of_no_job_or_a_job_not_queued_changes_nothing(redis_client: redis_lib.Redis) -> None:
    world = World(redis_client)
    before = queue_wait_sum()
    gone = world.lifecycle.claim(new_job_id(), WORKER)
    assert (gone.applied, gone.previous, gone.record) == (False, None, None)
    # A partial hash (a write that landed after the record was lost) is no job either, as for every reader.
    partial = new_job_id()
    redis_client.hset(job_key(partial), mapping={"status": "queued", "request": "{}"})
    done = world.lifecycle.claim(partial, WORKER)
    assert (done.applied, done.previous, done.record) == (False, None, None)
    assert redis_client.hgetall(job_key(partial)) == {b"status": b"queued", b"request": b"{}"}
    assert redis_client.zscore(RUNNING_SET, job_key(partial)) is None
    # A job canceled while queued is refused; the refusal says what it found.
    canceled = queued_job(redis_client, queue=world.queue)
    world.cancel(canceled.id)
    refused = world.lifecycle.claim(canceled.id, WORKER)
    assert not refused.applied and refused.previous is JobStatus.CANCELED
    assert refused.record is not None and refused.record.status is JobStatus.CANCELED
    assert refused.record.worker is None
    assert queue_wait_sum() == before
