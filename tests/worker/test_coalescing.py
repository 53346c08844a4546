"""Coalescing on the real stack: Redis, the API, a tiny-model GPU worker, the webhook worker.

With ``DARKROOM_COALESCE_MAX`` above 1 (it is 1, off, by default), compatible jobs queued while the worker
is busy run in one pipeline call once it is free, and each still has its own progress, webhooks, cancel and
outcome. The worker is kept busy by a long job that the test cancels once everything is queued, so the
group forms however slow the machine is.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from standardwebhooks.webhooks import Webhook

from schemas.generation import GenerationRequest
from services.jobs import JobStore
from tests.fixtures.http_receiver import HttpReceiver
from tests.fixtures.stack import TEST_WEBHOOK_SECRET, Stack, api_stack
from worker.engine import GenerationEngine

TERMINAL = {"succeeded", "failed", "canceled"}
BUSY: dict[str, Any] = {
    "prompt": "keeping the worker busy",
    "width": 512,
    "height": 512,
    "num_inference_steps": 100,
    "guidance_scale": 1.0,
    "seed": 1,
}
SMALL: dict[str, Any] = {"width": 512, "height": 512, "num_inference_steps": 2, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, shared_backend: Stack) -> Iterator[Stack]:
    """The shared backend's worker coalesces up to 4 jobs (DARKROOM_COALESCE_MAX)."""
    yield from api_stack(shared_backend, tmp_path_factory.mktemp("stack-coalescing"))


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def wait_until(client: httpx.Client, job_id: str, ready: Any, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not ready(job := client.get(f"/v1/generations/{job_id}").json()):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job  # type: ignore[no-any-return]


def started(job: dict[str, Any]) -> bool:
    return job["progress"] is not None or job["status"] in TERMINAL


def coalesced_with(stack: Stack, job_id: str) -> float | None:
    """How many jobs shared the job's pipeline call, as its stored timings say (None: it ran alone)."""
    record = JobStore(stack.redis(), timedelta(days=1)).get(job_id)
    assert record is not None and record.timings is not None, record
    return record.timings.get("coalesced")


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def queue_behind_busy_worker(client: httpx.Client, bodies: list[dict[str, Any]]) -> list[str]:
    """Submit ``bodies`` while a long job holds the worker, then cancel that job: they are all waiting
    when the worker turns to the queue."""
    busy = submit(client, BUSY)
    wait_until(client, busy, started)
    job_ids = [submit(client, body) for body in bodies]
    assert client.post(f"/v1/generations/{busy}/cancel").status_code in (200, 202)
    return job_ids


def test_compatible_queued_jobs_run_in_one_call_each_on_its_own_terms(
    stack: Stack, webhook_receiver: HttpReceiver, tiny_engine: GenerationEngine
) -> None:
    hook = {"webhook_url": webhook_receiver.url + "/hook", "webhook_events": ["started", "completed"]}
    coalesced = [
        {**SMALL, **hook, "prompt": "a red fox", "seed": 10},
        {**SMALL, **hook, "prompt": "a lighthouse", "seed": 11, "output_format": "webp"},
        {**SMALL, **hook, "prompt": "a bowl of ramen", "seed": 12},
        {**SMALL, **hook, "prompt": "a macro photo of a dew drop", "seed": 13},
    ]
    incompatible = {**SMALL, "prompt": "three steps", "num_inference_steps": 3, "seed": 14}
    with stack.client() as client:
        ids = queue_behind_busy_worker(client, [*coalesced[:2], incompatible, *coalesced[2:]])
        other = ids.pop(2)
        jobs = [wait_until(client, job_id, lambda j: j["status"] in TERMINAL) for job_id in ids]
        alone = wait_until(client, other, lambda j: j["status"] in TERMINAL)

    # The four compatible jobs (and only they: nothing else was queued) shared one call.
    assert [coalesced_with(stack, job_id) for job_id in ids] == [4, 4, 4, 4]
    assert alone["status"] == "succeeded" and coalesced_with(stack, other) is None  # not grouped
    store = JobStore(stack.redis(), timedelta(days=1))
    for job, body in zip(jobs, coalesced, strict=True):
        assert job["status"] == "succeeded", job
        events = [event for _, event in store.events_since(job["id"])]
        assert [e["data"]["status"] for e in events if e["type"] == "status"] == [
            "queued",
            "running",
            "succeeded",
        ]
        assert [e["data"]["step"] for e in events if e["type"] == "progress"] == [1, 2]
        [image] = job["images"]
        assert image["seed"] == body["seed"]
        data = httpx.get(image["url"], timeout=10).content
        reference = tiny_engine.generate(GenerationRequest.model_validate(job["request"])).images[0]
        assert image["content_type"] == reference.content_type
        bound = 2 if reference.content_type == "image/png" else 24  # lossy webp amplifies sub-level noise
        assert int(np.abs(pixels(data) - pixels(reference.data)).max()) <= bound

    deliveries = webhook_receiver.wait_for(8, timeout=30)
    seen = set()
    for delivery in deliveries:
        payload = Webhook(TEST_WEBHOOK_SECRET).verify(delivery.body, dict(delivery.headers))
        seen.add((payload["data"]["id"], payload["type"]))
    assert seen == {
        (job_id, kind) for job_id in ids for kind in ("generation.started", "generation.succeeded")
    }


def test_a_job_canceled_in_a_group_ends_at_once_and_the_others_finish(stack: Stack) -> None:
    bodies = [{**SMALL, "prompt": f"job {i}", "seed": 20 + i, "num_inference_steps": 8} for i in range(3)]
    with stack.client() as client:
        ids = queue_behind_busy_worker(client, bodies)
        wait_until(client, ids[1], lambda j: j["progress"] is not None)
        assert client.post(f"/v1/generations/{ids[1]}/cancel").status_code == 202
        canceled = wait_until(client, ids[1], lambda j: j["status"] in TERMINAL)
        meanwhile = [client.get(f"/v1/generations/{ids[i]}").json()["status"] for i in (0, 2)]
        others = [wait_until(client, ids[i], lambda j: j["status"] in TERMINAL) for i in (0, 2)]

    assert canceled["status"] == "canceled", canceled
    assert canceled["progress"]["step"] < 8
    assert meanwhile == ["running", "running"]  # the call went on without it
    assert [job["status"] for job in others] == ["succeeded", "succeeded"]
    # The three started in one call (the canceled one left it mid-way: it has no timings).
    assert [coalesced_with(stack, ids[i]) for i in (0, 2)] == [3, 3]
