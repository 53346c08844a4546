"""The runner's micro-batching against a real Redis, with a stand-in engine (no model, no torch work):
which waiting jobs join a batch, how they are claimed, and that each still ends on its own."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import redis as redis_lib
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from schemas.generation import GenerationRequest
from schemas.jobs import JobStatus
from services.jobs import JobRecord, JobStore, job_key, new_job_id, utcnow
from services.storage.local import FileStorage
from worker.encoding import EncodedImage
from worker.engine import GenerationResult
from worker.errors import GenerationCanceled
from worker.runner import WorkerContext, execute_generation

BASE: dict[str, Any] = {"width": 512, "height": 512, "num_inference_steps": 2, "guidance_scale": 1.0}


class StandInEngine:
    """Runs ``steps`` fake steps: progress and cancel checks per request, as the real engine does."""

    def __init__(self, steps: int = 2) -> None:
        self.steps = steps
        self.calls: list[list[str]] = []  # prompts of each call
        self.during_step: Any = None  # called with the step number, inside the "denoising loop"

    def _result(self, request: GenerationRequest) -> GenerationResult:
        images = [
            EncodedImage(b"\x89PNG fake", "image/png", "png", "0" * 64, 512, 512, seed)
            for seed in request.image_seeds()
        ]
        return GenerationResult(images=images, warnings=[], token_counts={}, timings={"generate_s": 0.0})

    def generate(self, request: GenerationRequest, **callbacks: Any) -> GenerationResult:
        [outcome] = self.generate_batch([request], **{k: [v] for k, v in callbacks.items()})
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def generate_batch(
        self,
        requests: list[GenerationRequest],
        *,
        on_progress: Any = None,
        should_cancel: Any = None,
        on_canceled: Any = None,
    ) -> list[Any]:
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
        return [o if o is not None else self._result(r) for o, r in zip(outcomes, requests, strict=True)]


@pytest.fixture
def setup(redis_url: str, tmp_path: Path) -> tuple[WorkerContext, Queue, StandInEngine]:
    connection = redis_lib.Redis.from_url(redis_url)
    store = JobStore(connection, timedelta(days=1))
    queue = Queue("darkroom", connection=connection, serializer=JSONSerializer)
    engine = StandInEngine()
    ctx = WorkerContext(
        engine=cast(Any, engine),
        store=store,
        storage=FileStorage(tmp_path),
        webhook_queue=Queue("darkroom-webhooks", connection=connection, serializer=JSONSerializer),
        worker_name="worker-a",
        progress_interval=timedelta(0),
        max_batch_size=4,
        generation_queue=queue,
    )
    return ctx, queue, engine


def submit(ctx: WorkerContext, queue: Queue, prompt: str, **fields: Any) -> str:
    job_id = new_job_id()
    init_image_key = fields.pop("init_image_key", None)
    request = GenerationRequest(**{"prompt": prompt, "seed": 1, **BASE, **fields}).normalized()
    stored = request.model_dump(mode="json", exclude={"init_image"})
    record = JobRecord(
        id=job_id,
        status=JobStatus.QUEUED,
        created_at=utcnow(),
        request=stored,
        init_image_key=init_image_key,
    )
    ctx.store.create(record)
    queue.enqueue("worker.tasks.run_generation", job_id, job_id=job_id, result_ttl=3600)
    return job_id


def dequeue(queue: Queue) -> str:
    """What RQ's dequeue does to the queue list before the task runs."""
    job_id = cast(bytes, queue.connection.lpop(queue.key)).decode()
    return job_id


def batch_of(ctx: WorkerContext, job_id: str) -> dict[str, Any] | None:
    raw = cast(bytes | None, ctx.store.redis.hget(job_key(job_id), "batch"))
    return json.loads(raw) if raw else None


def test_waiting_compatible_jobs_join_the_batch_and_each_ends_on_its_own(
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
    fourth = submit(ctx, queue, "fourth: the batch is full")
    assert dequeue(queue) == leader

    assert execute_generation(ctx, leader) == "succeeded"

    assert engine.calls == [["leader", "first", "second", "third"]]
    batch = batch_of(ctx, leader)
    assert batch is not None and batch["size"] == 4 and batch["jobs"] == [leader, first, second, third]
    for job_id in (leader, first, second, third):
        record = ctx.store.get(job_id)
        assert record is not None and record.status is JobStatus.SUCCEEDED
        assert record.worker == "worker-a" and batch_of(ctx, job_id) == batch
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
    ctx.store.transition(taken, JobStatus.RUNNING, allowed_from=(JobStatus.QUEUED,), fields={"worker": "b"})
    ctx.store.transition(canceled, JobStatus.CANCELED, allowed_from=(JobStatus.QUEUED,))

    execute_generation(ctx, leader)

    assert engine.calls == [["leader", "free"]]
    record = ctx.store.get(taken)
    assert record is not None and record.status is JobStatus.RUNNING and record.worker == "b"


def test_batch_size_one_turns_batching_off(setup: tuple[WorkerContext, Queue, StandInEngine]) -> None:
    ctx, queue, engine = setup
    ctx.max_batch_size = 1
    leader = submit(ctx, queue, "leader")
    submit(ctx, queue, "compatible")
    dequeue(queue)
    execute_generation(ctx, leader)
    assert engine.calls == [["leader"]]
    assert batch_of(ctx, leader) is None


def test_a_job_canceled_in_a_batch_is_recorded_at_once_while_the_others_run(
    setup: tuple[WorkerContext, Queue, StandInEngine],
) -> None:
    ctx, queue, engine = setup
    engine.steps = 3
    leader = submit(ctx, queue, "leader")
    doomed = submit(ctx, queue, "canceled at step 1")
    other = submit(ctx, queue, "other")
    dequeue(queue)
    seen_mid_batch: dict[str, Any] = {}

    def at_step(step: int) -> None:
        if step == 1:
            ctx.store.request_cancel(doomed)
        if step == 2:  # the batch is still running: the canceled job is already finished
            record = ctx.store.get(doomed)
            assert record is not None
            seen_mid_batch.update(status=record.status, held=ctx.held_jobs())

    engine.during_step = at_step
    assert execute_generation(ctx, leader) == "succeeded"

    assert seen_mid_batch == {"status": JobStatus.CANCELED, "held": {leader, other}}
    record = ctx.store.get(doomed)
    assert record is not None and record.status is JobStatus.CANCELED
    assert record.error == {"type": "canceled", "message": "canceled after denoising step 2"}
    assert record.progress == {"step": 2, "total": 3}
    for job_id in (leader, other):
        record = ctx.store.get(job_id)
        assert record is not None and record.status is JobStatus.SUCCEEDED
    job = Job.fetch(doomed, connection=queue.connection, serializer=JSONSerializer)
    assert job.return_value() == "canceled"
