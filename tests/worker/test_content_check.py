"""The image-classifier hook inside the runner, for jobs run alone and coalesced (real Redis, file
storage, a stand-in engine that draws real PNGs): each job's images are judged on their pixels, filtered
ones are listed but never stored, and a classifier that fails or answers nonsense fails the job."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat
from rq import Queue

from schemas.generation import GenerationRequest
from schemas.jobs import JobStatus
from services.content_safety import ALLOWED, Verdict, filtered
from worker.encoding import encode_image
from worker.engine import GenerationResult
from worker.runner import WorkerContext, execute_generation

from .test_runner_coalescing import StandInEngine, dequeue, submit
from .test_runner_coalescing import setup as setup  # noqa: F401  (the fixture, re-exported)


class DrawingEngine(StandInEngine):
    """Real PNGs: bright for even seeds, dark for odd ones, so a pixel rule can tell them apart."""

    def _result(self, request: GenerationRequest, coalesced: int) -> GenerationResult:
        images = [
            encode_image(
                Image.new("RGB", (512, 512), (250,) * 3 if seed % 2 == 0 else (5,) * 3), request, seed, i, "t"
            )
            for i, seed in enumerate(request.image_seeds())
        ]
        return GenerationResult(images=images, warnings=[], token_counts={}, timings={})


class TooBright:
    """Withholds images whose mean brightness is over half, and remembers what it was shown."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, tuple[int, int]]] = []

    def __call__(self, image: Image.Image, request: GenerationRequest, index: int) -> Verdict:
        self.seen.append((request.prompt, index, image.size))
        return filtered("too-bright") if ImageStat.Stat(image).mean[0] > 128 else ALLOWED


def stored(ctx: WorkerContext, job_id: str) -> list[str]:
    root = Path(ctx.storage.root)  # type: ignore[attr-defined]
    return sorted(p.name for p in root.rglob("*") if p.is_file() and job_id in str(p))


@pytest.fixture
def ctx(setup: tuple[WorkerContext, Queue, StandInEngine]) -> tuple[WorkerContext, Queue]:  # noqa: F811
    context, queue, _ = setup
    context.engine = DrawingEngine()  # type: ignore[assignment]
    return context, queue


def test_each_job_of_a_coalesced_group_has_its_images_judged(ctx: tuple[WorkerContext, Queue]) -> None:
    context, queue = ctx
    classifier = TooBright()
    context.image_classifier = classifier
    leader = submit(context, queue, "leader", seed=1, num_images=2)  # seeds 1 (dark), 2 (bright)
    partner = submit(context, queue, "partner", seed=4)  # bright
    assert dequeue(queue) == leader

    assert execute_generation(context, leader) == "succeeded"

    assert context.engine.calls == [["leader", "partner"]]  # type: ignore[attr-defined]
    assert classifier.seen == [
        ("leader", 0, (512, 512)),
        ("leader", 1, (512, 512)),
        ("partner", 0, (512, 512)),
    ]
    lead = context.store.get(leader)
    assert lead is not None and lead.status is JobStatus.SUCCEEDED
    assert [(i["seed"], i["finish_reason"], i.get("filter_reason")) for i in lead.images] == [
        (1, "stop", None),
        (2, "content_filtered", "too-bright"),
    ]
    assert "key" not in lead.images[1] and "sha256" not in lead.images[1]
    assert lead.warnings == [
        "1 of 2 images were withheld by the content filter (finish_reason content_filtered)"
    ]
    assert stored(context, leader) == ["0.png"]
    other = context.store.get(partner)
    assert other is not None and other.status is JobStatus.SUCCEEDED  # all withheld: still a finished run
    assert [i["finish_reason"] for i in other.images] == ["content_filtered"]
    assert stored(context, partner) == []


@pytest.mark.parametrize(
    ("classifier", "message"),
    [
        (lambda image, request, index: 1 / 0, "ZeroDivisionError"),
        (lambda image, request, index: True, "returned bool"),
    ],
)
def test_a_classifier_that_fails_fails_the_job_and_stores_nothing(
    ctx: tuple[WorkerContext, Queue], classifier: Any, message: str
) -> None:
    context, queue = ctx
    context.coalescing = replace(context.coalescing, max_jobs=1)  # run alone
    context.image_classifier = classifier
    job_id = submit(context, queue, "a fox", seed=1)
    dequeue(queue)

    assert execute_generation(context, job_id) == "failed"

    record = context.store.get(job_id)
    assert record is not None and record.error is not None
    assert record.error["type"] == "content_check_failed" and message in record.error["message"]
    assert record.images == [] and stored(context, job_id) == []


def test_without_a_classifier_every_image_is_stored_as_stop(ctx: tuple[WorkerContext, Queue]) -> None:
    context, queue = ctx
    job_id = submit(context, queue, "a fox", seed=2, num_images=2)
    dequeue(queue)
    assert execute_generation(context, job_id) == "succeeded"
    record = context.store.get(job_id)
    assert record is not None and [i["finish_reason"] for i in record.images] == ["stop", "stop"]
    assert stored(context, job_id) == ["0.png", "1.png"]
