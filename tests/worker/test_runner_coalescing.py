"""The runner's coalescing against a real Redis, with a stand-in engine (no model, no torch work): which
waiting jobs join a group, how they are claimed, that each still ends on its own, and that a job run alone
takes the very same path (``run_group`` with N = 1)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import redis as redis_lib
from prometheus_client import REGISTRY
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from schemas.generation import GenerationRequest
from schemas.jobs import JobStatus
from services import rq_records
from services.jobs import JobRecord, JobStore, Lifecycle, new_job_id, utcnow
from services.storage.local import FileStorage
from tests.fixtures.jobs import create_job, lifecycle_record
from worker import coalescing, runner
from worker.coalescing import Coalescing
from worker.encoding import EncodedImage
from worker.engine import GenerationResult, coalesce_key
from worker.errors import GenerationCanceled
from worker.runner import WorkerContext, execute_generation, run_group

BASE: dict[str, Any] = {"width": 512, "height": 512, "num_inference_steps": 2, "guidance_scale": 1.0}


class StandInEngine:
    """Runs ``steps`` fake steps: progress and cancel checks per request, as the real engine does, and
    refuses a group of several requests that do not share one coalesce key, as the real engine does."""

    def __init__(self, steps: int = 2) -> None:
        self.steps = steps
        self.calls: list[list[str]] = []  # prompts of each call
        self.during_step: Any = None  # called with the step number, inside the "denoising loop"

    def _result(self, request: GenerationRequest, coalesced: int) -> GenerationResult:
        images = [
            EncodedImage(b"\x89PNG fake", "image/png", "png", "0" * 64, 512, 512, seed)
            for seed in request.image_seeds()
        ]
        timings = {"generate_s": 0.0, **({"coalesced": float(coalesced)} if coalesced > 1 else {})}
        return GenerationResult(images=images, warnings=[], token_counts={}, timings=timings)

    def generate_group(
        self,
        requests: list[GenerationRequest],
        *,
        on_progress: Any = None,
        should_cancel: Any = None,
        on_canceled: Any = None,
    ) -> list[Any]:
        keys = {coalesce_key(request) for request in requests}
        if not requests or (len(requests) > 1 and (None in keys or len(keys) != 1)):
            raise ValueError("a group of several requests needs one coalesce_key")
        self.calls.append([r.prompt for r in requests])
        count = len(requests)
        outcomes: list[Any] = [None] * count
        for step in range(1, self.steps + 1):
            for i in range(count):
                if outcomes[i] is None:
                    (on_progress or [None] * count)[i](step, self.steps)
                    check = (should_cancel or [None] * count)[i]
                    if check is not None and check():
                        outcomes[i] = GenerationCanceled(f"canceled after denoising step {step}")
                        if on_canceled is not None and on_canceled[i] is not None:
                            on_canceled[i](outcomes[i])
            if self.during_step is not None:
                self.during_step(step)
        return [
            o if o is not None else self._result(r, count) for o, r in zip(outcomes, requests, strict=True)
        ]


@pytest.fixture
def setup(redis_url: str, tmp_path: Path) -> tuple[WorkerContext, Queue, StandInEngine]:
    connection = redis_lib.Redis.from_url(redis_url)
    queue = Queue("darkroom", connection=connection, serializer=JSONSerializer)
    engine = StandInEngine()
    ctx = WorkerContext(
        engine=cast(Any, engine),
        store=JobStore(connection, timedelta(days=1)),
        lifecycle=Lifecycle(connection, timedelta(days=1)),
        storage=FileStorage(tmp_path),
        worker_name="worker-a",
        progress_interval=timedelta(0),
        coalescing=Coalescing(max_jobs=4, generation_queue=queue),  # DARKROOM_COALESCE_MAX=4
    )
    return ctx, queue, engine


def submit(ctx: WorkerContext, queue: Queue, prompt: str, **fields: Any) -> str:
    init_image_key = fields.pop("init_image_key", None)
    request = GenerationRequest(**{"prompt": prompt, "seed": 1, **BASE, **fields}).normalized()
    record = JobRecord(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        created_at=utcnow(),
        request=request.model_dump(mode="json", exclude={"init_image"}),
        init_image_key=init_image_key,
    )
    create_job(ctx.store.redis, record)
    queue.enqueue("worker.tasks.run_generation", record.id, job_id=record.id, result_ttl=3600)
    return record.id


def dequeue(queue: Queue) -> str:
    """What RQ's dequeue does to the queue list before the task runs."""
    job_id = cast(bytes, queue.connection.lpop(queue.key)).decode()
    return job_id


def coalesced_with(ctx: WorkerContext, job_id: str) -> float | None:
    """How many jobs shared the job's pipeline call, as its stored timings say (None: it ran alone)."""
    record = ctx.store.get(job_id)
    assert record is not None and record.timings is not None
    return record.timings.get("coalesced")


def test_waiting_compatible_jobs_are_coalesced_and_each_ends_on_its_own(
    setup: tuple[WorkerContext, Queue, StandInEngine],
) -> None:
    ctx, queue, engine = setup
    leader = submit(ctx, queue, "leader")
    first = submit(ctx, queue, "first")
    steps = submit(ctx, queue, "other steps", num_inference_steps=3)
    size = submit(ctx, queue, "other size", width=768)
    img2img = submit(ctx, queue, "image to image", init_image_key="in/x.png")
    second = submit(ctx, queue, "second", output_format="jpeg", seed=9)
    too_many_images = submit(ctx, queue, "three images", num_images=3)
    third = submit(ctx, queue, "third")
    fourth = submit(ctx, queue, "fourth: the group is full")
    assert dequeue(queue) == leader

    assert execute_generation(ctx, leader) == "succeeded"

    assert engine.calls == [["leader", "first", "second", "third"]]
    for job_id in (leader, first, second, third):
        record = ctx.store.get(job_id)
        assert record is not None and record.status is JobStatus.SUCCEEDED
        assert record.worker == "worker-a" and coalesced_with(ctx, job_id) == 4
        assert record.progress == {"step": 2, "total": 2}
        statuses = [e["data"]["status"] for _, e in ctx.store.events_since(job_id) if e["type"] == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        progress = [e["data"]["step"] for _, e in ctx.store.events_since(job_id) if e["type"] == "progress"]
        assert progress == [1, 2]
    second_record = ctx.store.get(second)
    assert second_record is not None and second_record.images[0]["seed"] == 9
    # Partners are off the RQ list, and their RQ jobs finished as if RQ had run them.
    assert queue.get_job_ids() == [steps, size, img2img, too_many_images, fourth]
    for job_id in (first, second, third):
        job = Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
        assert job.get_status() == "finished" and job.return_value() == "succeeded"
        assert job_id in queue.finished_job_registry
        assert 0 < cast(int, queue.connection.ttl(job.key)) <= 3600
    for job_id in (steps, size, img2img, too_many_images, fourth):
        record = ctx.store.get(job_id)
        assert record is not None and record.status is JobStatus.QUEUED
    assert ctx.held_jobs() == set()


def test_jobs_someone_else_holds_or_canceled_are_not_taken(
    setup: tuple[WorkerContext, Queue, StandInEngine],
) -> None:
    ctx, queue, engine = setup
    leader = submit(ctx, queue, "leader")
    taken = submit(ctx, queue, "claimed by worker-b a moment ago")
    canceled = submit(ctx, queue, "canceled while queued")
    submit(ctx, queue, "free")
    dequeue(queue)
    # Both still listed on RQ's queue: the status, not the list, says they are not to be taken.
    assert ctx.lifecycle.claim(lifecycle_record(ctx.store.redis, taken), "worker-b").applied
    assert ctx.lifecycle.cancel_queued(canceled, "canceled").applied

    execute_generation(ctx, leader)

    assert engine.calls == [["leader", "free"]]
    record = ctx.store.get(taken)
    assert record is not None and record.status is JobStatus.RUNNING and record.worker == "worker-b"
    record = ctx.store.get(canceled)
    assert record is not None and record.status is JobStatus.CANCELED


def test_a_partner_canceled_or_taken_after_the_queue_was_read_is_refused_by_its_claim(
    setup: tuple[WorkerContext, Queue, StandInEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partner is not read again before its claim: the claim itself refuses what changed meanwhile."""
    ctx, queue, engine = setup
    leader = submit(ctx, queue, "leader")
    canceled = submit(ctx, queue, "canceled after the read")
    taken = submit(ctx, queue, "taken by worker-b after the read")
    free = submit(ctx, queue, "free")
    dequeue(queue)
    read_queue = coalescing.waiting_candidates

    def then_changed(*args: Any) -> list[coalescing.Candidate]:
        found = read_queue(*args)
        assert ctx.lifecycle.cancel_queued(canceled, "canceled").applied
        assert ctx.lifecycle.claim(taken, "worker-b").applied
        return found

    monkeypatch.setattr(coalescing, "waiting_candidates", then_changed)
    assert execute_generation(ctx, leader) == "succeeded"

    assert engine.calls == [["leader", "free"]]
    records = {job_id: lifecycle_record(ctx.store.redis, job_id) for job_id in (canceled, taken, free)}
    assert records[canceled].status is JobStatus.CANCELED
    assert records[taken].status is JobStatus.RUNNING and records[taken].worker == "worker-b"
    assert records[free].status is JobStatus.SUCCEEDED and coalesced_with(ctx, free) == 2
    assert queue.get_job_ids() == [canceled, taken]  # a refused claim leaves RQ's list alone


def test_coalescing_is_off_by_default_and_with_coalesce_max_one(
    setup: tuple[WorkerContext, Queue, StandInEngine],
) -> None:
    ctx, queue, engine = setup
    assert WorkerContext(**{**ctx.__dict__, "coalescing": Coalescing()}).coalescing.max_jobs == 1
    ctx.coalescing = Coalescing(max_jobs=1, generation_queue=queue)
    leader = submit(ctx, queue, "leader")
    compatible = submit(ctx, queue, "compatible")
    dequeue(queue)
    execute_generation(ctx, leader)
    assert engine.calls == [["leader"]]
    assert coalesced_with(ctx, leader) is None
    assert queue.get_job_ids() == [compatible]


def test_a_job_canceled_in_a_group_is_recorded_at_once_while_the_others_run(
    setup: tuple[WorkerContext, Queue, StandInEngine],
) -> None:
    ctx, queue, engine = setup
    engine.steps = 3
    leader = submit(ctx, queue, "leader")
    doomed = submit(ctx, queue, "canceled at step 1")
    other = submit(ctx, queue, "other")
    dequeue(queue)
    seen_mid_call: dict[str, Any] = {}

    def at_step(step: int) -> None:
        if step == 1:
            assert ctx.lifecycle.request_cancel(doomed) is JobStatus.RUNNING
        if step == 2:  # the group is still running: the canceled job is already finished
            record = ctx.store.get(doomed)
            assert record is not None
            seen_mid_call.update(status=record.status, held=ctx.held_jobs())

    engine.during_step = at_step
    assert execute_generation(ctx, leader) == "succeeded"

    assert seen_mid_call == {"status": JobStatus.CANCELED, "held": {leader, other}}
    record = ctx.store.get(doomed)
    assert record is not None and record.status is JobStatus.CANCELED
    assert record.error == {"type": "canceled", "message": "canceled after denoising step 2"}
    assert record.progress == {"step": 2, "total": 3}
    for job_id in (leader, other):
        record = ctx.store.get(job_id)
        assert record is not None and record.status is JobStatus.SUCCEEDED
    job = Job.fetch(doomed, connection=queue.connection, serializer=JSONSerializer)
    assert job.return_value() == "canceled"


@pytest.mark.parametrize("partners", [0, 2], ids=["alone", "coalesced"])
def test_a_job_alone_and_a_coalesced_group_take_the_same_run_path(
    setup: tuple[WorkerContext, Queue, StandInEngine], monkeypatch: pytest.MonkeyPatch, partners: int
) -> None:
    """One ``run_group`` for N = 1 and N > 1: a job whose init image cannot be read fails with its own
    error code, the same alone as in a group, and its group partners still succeed."""
    ctx, queue, engine = setup
    groups: list[list[str]] = []

    def spy(ctx: WorkerContext, records: list[JobRecord]) -> dict[str, str]:
        groups.append([record.id for record in records])
        return run_group(ctx, records)

    monkeypatch.setattr(runner, "run_group", spy)  # what execute_generation calls
    # As the run finds it: the init image was uploaded with the request, and is gone from storage now.
    doomed = submit(ctx, queue, "init image gone", init_image_key="inputs/gone.png")
    mates = [submit(ctx, queue, f"partner {i}") for i in range(partners)]
    if partners:
        # An image-to-image job never joins a group through the queue (it always runs alone); a group
        # that holds one all the same — claimed, then run — must still end each job on its own.
        for job_id in (doomed, *mates):
            queue.connection.lrem(queue.key, 0, job_id)
            assert runner.claim(ctx, job_id).applied
        records = [lifecycle_record(ctx.store.redis, job_id) for job_id in (doomed, *mates)]
        outcomes = run_group(ctx, records)
    else:
        assert dequeue(queue) == doomed
        outcomes = {doomed: execute_generation(ctx, doomed)}
        assert groups == [[doomed]]  # a job run alone is a group of one

    assert outcomes == {doomed: "failed", **dict.fromkeys(mates, "succeeded")}
    record = ctx.store.get(doomed)
    assert record is not None and record.status is JobStatus.FAILED and record.error is not None
    assert record.error["type"] == "storage_error" and "inputs/gone.png" in record.error["message"]
    assert engine.calls == ([[f"partner {i}" for i in range(partners)]] if partners else [])
    for job_id in mates:
        record = ctx.store.get(job_id)
        assert record is not None and record.status is JobStatus.SUCCEEDED
        assert coalesced_with(ctx, job_id) == partners
    assert ctx.held_jobs() == set()


def run_time(outcome: str) -> tuple[float, float]:
    """(count, sum) of ``darkroom_generation_run_seconds`` for ``outcome``, in this process."""
    labels = {"outcome": outcome}
    count = REGISTRY.get_sample_value("darkroom_generation_run_seconds_count", labels) or 0.0
    return count, REGISTRY.get_sample_value("darkroom_generation_run_seconds_sum", labels) or 0.0


@pytest.mark.parametrize("coalesce_max", [1, 2], ids=["alone", "coalesced"])
def test_each_jobs_run_time_counts_from_its_own_claim(
    setup: tuple[WorkerContext, Queue, StandInEngine], coalesce_max: int
) -> None:
    """Not from the moment of finishing (a run time of 0), nor from a previous attempt's start."""
    ctx, queue, engine = setup
    ctx.coalescing = Coalescing(max_jobs=coalesce_max, generation_queue=queue)
    leader = submit(ctx, queue, "leader")
    partner = submit(ctx, queue, "second attempt")
    # The partner's first attempt started an hour ago on a worker that died; recovery put it back.
    an_hour_ago = utcnow() - timedelta(hours=1)
    first_run = lifecycle_record(ctx.store.redis, partner)
    assert ctx.lifecycle.claim(first_run, "worker-b", at=an_hour_ago).applied
    requeue = rq_records.requeued_at_front(ctx.store.redis, queue, partner)
    assert ctx.lifecycle.requeue(first_run, guard=("worker", "worker-b"), rq=requeue).applied
    queue.connection.lrem(queue.key, 0, partner)
    queue.connection.rpush(queue.key, partner)  # behind the leader
    engine.during_step = lambda step: time.sleep(0.1)  # each call takes 0.2 s (two steps)
    before = run_time("succeeded")

    assert dequeue(queue) == leader
    assert execute_generation(ctx, leader) == "succeeded"
    if coalesce_max == 1:
        assert dequeue(queue) == partner
        assert execute_generation(ctx, partner) == "succeeded"

    count, seconds = (now - then for now, then in zip(run_time("succeeded"), before, strict=True))
    assert count == 2
    assert 0.4 <= seconds < 60, seconds
