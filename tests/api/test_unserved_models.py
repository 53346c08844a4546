"""No stranded jobs, against real processes: a job queued for a model nobody serves any more fails
``model_unavailable`` with a message naming the model, and its ``generation.failed`` webhook reaches a
real receiver, signed — whether the model's worker went away (an accepted model, after
``DARKROOM_UNSERVED_AFTER``) or the API stopped accepting the model (``make run``'s fallback to the tiny
model, a model taken out of ``DARKROOM_MODELS``: at once)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.fixtures.http_receiver import HttpReceiver
from tests.fixtures.stack import TEST_WEBHOOK_SECRET, Stack, api_stack, stop_process

OTHER = "tiny-other"
REMOVED = "owner/removed-model"
FAST: dict[str, Any] = {"prompt": "a lighthouse", "width": 512, "height": 512, "num_inference_steps": 2}
#: The API side's timings: a stranded job waits 2 s, an API's "I accept these models" lasts 3 s.
FAST_SWEEP = {"DARKROOM_UNSERVED_AFTER": "2", "DARKROOM_LOST_AFTER": "3"}


def ready_workers(client: httpx.Client, model: str) -> int:
    answer = client.get(f"/v1/models/{model}")
    assert answer.status_code == 200, answer.text
    return int(answer.json()["ready_workers"])


def failed_webhook(receiver: HttpReceiver, job_id: str) -> dict[str, Any]:
    (request,) = receiver.wait_for(1, timeout=30)
    event: dict[str, Any] = Webhook(TEST_WEBHOOK_SECRET).verify(request.body, dict(request.headers))
    assert event["type"] == "generation.failed" and event["data"]["id"] == job_id, event
    return event


@pytest.fixture
def two_models(tmp_path: Path, shared_backend: Stack) -> Iterator[Stack]:
    """An API serving "tiny" (the shared backend's worker) and OTHER, whose worker the test starts."""
    stacks = api_stack(shared_backend, tmp_path / "api", {"DARKROOM_MODELS": OTHER, **FAST_SWEEP})
    stack = next(stacks)
    try:
        yield stack
    finally:
        stacks.close()


def test_a_job_for_a_model_whose_workers_went_away_fails_and_its_webhook_fires(
    two_models: Stack, webhook_receiver: HttpReceiver
) -> None:
    stack = two_models
    stack.start_worker("worker-other", {"DARKROOM_MODEL": "tiny", "DARKROOM_MODEL_NAME": OTHER})
    with stack.client() as client:
        deadline = time.monotonic() + 120
        while ready_workers(client, OTHER) != 1:
            assert time.monotonic() < deadline, "the other model's worker never got ready"
            time.sleep(0.1)
        assert stop_process(stack.processes["worker-other"]) == 0  # the model leaves the fleet
        body = {**FAST, "model": OTHER, "webhook_url": webhook_receiver.url}
        created = client.post("/v1/generations", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        started = time.monotonic()
        job = stack.wait_for(job_id, {"failed", "succeeded", "canceled"}, timeout=30)
        waited = time.monotonic() - started
        # Not before the grace (2 s from the later of submission and the worker's going), nor much after.
        assert 1.5 <= waited < 15, waited
        assert job["status"] == "failed", job
        assert job["error"]["type"] == "model_unavailable"
        assert repr(OTHER) in job["error"]["message"], job["error"]
        assert job.get("queue_position") is None
        assert client.get(f"/v1/models/{OTHER}").json()["queued"] == 0  # off its queue
        # The default model's worker is untouched and still serves.
        served = client.post("/v1/generations", json=FAST).json()["id"]
        assert stack.wait_for(served, {"succeeded", "failed"})["status"] == "succeeded"
    event = failed_webhook(webhook_receiver, job_id)
    assert event["data"]["error"]["type"] == "model_unavailable"


def test_a_job_for_a_model_no_api_accepts_any_more_fails_at_once(
    tmp_path: Path, shared_backend: Stack, webhook_receiver: HttpReceiver
) -> None:
    """``make run``'s fallback: a job queued for the hub model, then the API restarted on the tiny one
    (here: an API accepting REMOVED stops, one that does not takes over). No grace applies: the API
    refuses the model now, so nothing will ever serve the job."""
    patient = {**FAST_SWEEP, "DARKROOM_UNSERVED_AFTER": "3600"}  # only the "no API accepts it" rule
    first = api_stack(shared_backend, tmp_path / "before", {"DARKROOM_MODELS": REMOVED, **patient})
    stack = next(first)
    try:
        with stack.client() as client:
            body = {**FAST, "model": REMOVED, "webhook_url": webhook_receiver.url}
            created = client.post("/v1/generations", json=body)
            assert created.status_code == 202, created.text
            job_id = created.json()["id"]
            time.sleep(1.5)  # two sweeps of this API: the job waits while the model is accepted
            assert client.get(f"/v1/generations/{job_id}").json()["status"] == "queued"
    finally:
        first.close()
    second = api_stack(shared_backend, tmp_path / "after", patient)
    stack = next(second)
    try:
        job = stack.wait_for(job_id, {"failed", "succeeded", "canceled"}, timeout=30)
        assert job["status"] == "failed", job
        assert job["error"]["type"] == "model_unavailable"
        message = job["error"]["message"]
        assert repr(REMOVED) in message and "GET /v1/models" in message, message
        with stack.client() as client:  # the model is not listed, but the job's own error explains
            assert client.get(f"/v1/models/{REMOVED}").status_code == 404
        failed_webhook(webhook_receiver, job_id)
    finally:
        second.close()
