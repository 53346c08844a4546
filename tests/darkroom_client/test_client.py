"""``DarkroomClient`` against the running stack: errors as problems, waiting by stream or polling, downloads.

A recording transport (conftest's; the real one underneath) shows *how* the client waited, not just that
it did.
Bearer scoping and non-problem error pages need no server: httpx's ``MockTransport`` answers those.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from darkroom_client import (
    ChecksumMismatch,
    CreateGeneration,
    DarkroomClient,
    DarkroomError,
    ImageGenerationRequest,
    Job,
    JobStatus,
    WaitTimeout,
)
from darkroom_client.client import STREAM_FAILURES_BEFORE_POLLING
from schemas.generation import GenerationRequest
from tests.darkroom_client.conftest import SMALL, TINY, UNSERVED_MODEL, RecordingTransport
from tests.fixtures.stack import ROOT, Stack

UNAUTHORIZED = {
    "type": "urn:darkroom:problem:unauthorized",
    "title": "Unauthorized",
    "status": 401,
    "code": "unauthorized",
}


def test_problem_details_become_darkroom_errors(client: DarkroomClient) -> None:
    with pytest.raises(DarkroomError) as invalid:
        client.generate({"prompt": "a fox", "width": 500, "height": 512})  # a mapping skips local checks
    assert (invalid.value.status, invalid.value.code) == (422, "validation_error")
    assert [error.field for error in invalid.value.errors] == ["width"]
    assert "width: width 500 is not a multiple of 16" in str(invalid.value)

    with pytest.raises(DarkroomError) as missing:
        client.get("gen_missing")
    assert (missing.value.status, missing.value.code, missing.value.retryable) == (404, "not_found", False)
    assert missing.value.detail == "no generation job 'gen_missing'"

    with pytest.raises(DarkroomError) as odd_id:
        client.cancel("../../healthz")  # quoted into one path segment, never a different route
    assert odd_id.value.status == 404


def test_prefer_wait_idempotency_replayed_events_and_no_cancel_once_finished(client: DarkroomClient) -> None:
    request = CreateGeneration(prompt="a fox", width=512, height=512, num_inference_steps=3, seed=7)
    job = client.generate(request, idempotency_key="finished-fox", wait=30)
    assert job.status is JobStatus.SUCCEEDED and job.images[0].seed == 7
    assert client.generate(request, idempotency_key="finished-fox").id == job.id
    with pytest.raises(DarkroomError) as reused:
        client.generate(request.model_copy(update={"seed": 8}), idempotency_key="finished-fox")
    assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")
    with pytest.raises(DarkroomError) as finished:
        client.cancel(job.id)
    assert (finished.value.status, finished.value.code) == (409, "job_already_finished")

    events = list(client.events(job.id))  # a finished job's stream replays, then ends
    assert [event.type for event in events] == ["status", "status"] + ["progress"] * 3 + ["status", "job"]
    assert [event.status for event in events if event.status] == [
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        JobStatus.SUCCEEDED,
    ]
    assert [event.progress.step for event in events if event.progress] == [1, 2, 3]
    final = events[-1].job
    assert final is not None and (final.id, final.status) == (job.id, JobStatus.SUCCEEDED)
    assert [image.sha256 for image in final.images] == [image.sha256 for image in job.images]
    assert all(event.id for event in events)
    resumed = list(client.events(job.id, last_event_id=events[4].id))
    assert [event.type for event in resumed] == ["status", "job"]


def test_wait_follows_the_event_stream_and_reports_every_step(client_stack: Stack, tmp_path: Path) -> None:
    transport = RecordingTransport()
    seen: list[Job] = []
    with DarkroomClient(client_stack.api_url, transport=transport) as client:
        job = client.generate(SMALL | {"seed": 11})
        done = client.wait(job, timeout=60, on_progress=seen.append)

        assert done.status is JobStatus.SUCCEEDED and len(done.images) == 1
        steps = [update.progress.step for update in seen if update.progress and not update.status.is_terminal]
        assert steps == [1, 2, 3, 4]  # every step, in order, from one stream: polling could not promise it
        assert seen[-1].status is JobStatus.SUCCEEDED
        assert transport.count("/events") == 1

        path = client.download(done.images[0], tmp_path / "fox.png")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == done.images[0].sha256

        tampered = done.images[0].model_copy(update={"sha256": "0" * 64})
        with pytest.raises(ChecksumMismatch):
            client.download(tampered, tmp_path / "bad.png")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.png"]  # neither file nor partial


def test_wait_falls_back_to_polling_when_the_stream_is_unusable(client_stack: Stack) -> None:
    transport = RecordingTransport(break_event_streams=True)
    with DarkroomClient(client_stack.api_url, transport=transport) as client:
        job = client.generate(SMALL | {"seed": 12})
        done = client.wait(job, timeout=60, on_progress=lambda _: None, poll_interval=0.1)
    assert done.status is JobStatus.SUCCEEDED and done.images
    assert transport.count("/events") == STREAM_FAILURES_BEFORE_POLLING
    assert transport.count(f"/v1/generations/{job.id}") >= 1


def test_wait_gives_up_at_its_timeout_and_the_job_goes_on(client: DarkroomClient, blocker: str) -> None:
    job = client.generate(SMALL | {"seed": 13})
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timed_out:
        client.wait(job, timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 5.0
    assert timed_out.value.job.id == job.id and timed_out.value.job.status is JobStatus.QUEUED
    assert client.cancel(job.id).status is JobStatus.CANCELED


def test_list_models_shows_the_default_and_an_unserved_model_with_its_waiting_job(
    client: DarkroomClient,
) -> None:
    before = client.list_models()
    assert [(model.id, model.default) for model in before] == [("tiny", True), (UNSERVED_MODEL, False)]
    assert [model.ready_workers for model in before] == [1, 0]
    assert before[0].created > 0 and before[1].created == 0  # no worker has ever served tiny-b here

    waiting = client.generate({**TINY, "model": UNSERVED_MODEL})  # nobody serves it: it stays queued
    try:
        assert waiting.request.model == UNSERVED_MODEL
        counts = {model.id: (model.queued, model.batch_queued) for model in client.list_models()}
        assert counts[UNSERVED_MODEL] == (1, 0)
    finally:
        assert client.cancel(waiting.id).status is JobStatus.CANCELED
    with pytest.raises(DarkroomError) as unknown:
        client.generate(CreateGeneration(**TINY, model="sd-nope"))
    assert (unknown.value.status, unknown.value.code) == (422, "model_not_found")
    assert [error.field for error in unknown.value.errors] == ["model"]


def test_get_model_reads_one_model_and_an_unknown_one_is_model_not_found(client: DarkroomClient) -> None:
    served = {model.id: model for model in client.list_models()}
    for name in served:
        assert client.get_model(name) == served[name]
    with pytest.raises(DarkroomError) as unknown:
        client.get_model("stabilityai/sd-nope")  # a hub id: its slash stays a slash in the path
    assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")


def test_create_image_answers_openais_images_response_for_a_job_of_our_own(client: DarkroomClient) -> None:
    request = ImageGenerationRequest(prompt="a fox", size="512x512", num_inference_steps=2, seed=3)
    answer = client.create_image(request, idempotency_key="client-image-1")
    [image] = answer.data
    assert (answer.size, answer.output_format, image.seed) == ("512x512", "png", 3)
    assert image.b64_json is not None and base64.b64decode(image.b64_json).startswith(b"\x89PNG")
    job = client.get(answer.id)  # an ordinary job behind it
    assert job.status is JobStatus.SUCCEEDED and job.request.num_inference_steps == 2
    again = client.create_image(
        {"prompt": "a fox", "size": "512x512", "num_inference_steps": 2, "seed": 3},
        idempotency_key="client-image-1",
    )
    assert again.id == answer.id  # a model and a plain dict are the same request
    with pytest.raises(DarkroomError) as refused:
        client.create_image({"prompt": "a fox", "model": "dall-e-3"})
    assert (refused.value.status, refused.value.code) == (422, "model_not_found")


# --- without a server ---------------------------------------------------------------------------------------


#: Each operation of the API and the client method that calls it (docs/client.md lists the same).
OPERATION_METHODS = {
    "createGeneration": "generate",
    "getGeneration": "get",
    "cancelGeneration": "cancel",
    "streamGenerationEvents": "events",
    "createBatch": "create_batch",
    "listBatches": "list_batches",
    "getBatch": "get_batch",
    "cancelBatch": "cancel_batch",
    "createImage": "create_image",
    "listModels": "list_models",
    "retrieveModel": "get_model",
    "downloadFile": "download",
}


def test_every_operation_of_the_api_has_a_client_method() -> None:
    """A new route without a client method fails here, as it would in a generated client."""
    spec = json.loads((ROOT / "docs" / "openapi.json").read_text())
    operations = {
        operation["operationId"]
        for path, item in spec["paths"].items()
        if path.startswith("/v1/")
        for method, operation in item.items()
        # HEAD is GET without the body: the client's GET method covers it.
        if method != "head" and isinstance(operation, dict) and "operationId" in operation
    }
    assert operations == set(OPERATION_METHODS)
    assert all(callable(getattr(DarkroomClient, method)) for method in OPERATION_METHODS.values())


def test_the_api_key_goes_to_the_api_origin_only(tmp_path: Path) -> None:
    """Presigned S3 URLs refuse a second credential, and a CDN must never see the key."""
    authorization: dict[str, str | None] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        authorization[request.url.host] = request.headers.get("authorization")
        if request.url.host == "api.example":
            return httpx.Response(401, json=UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
        return httpx.Response(200, content=b"image bytes")

    transport = httpx.MockTransport(answer)
    with DarkroomClient("https://api.example", api_key="sk-secret", transport=transport) as client:
        with pytest.raises(DarkroomError) as refused:
            client.get("gen_1")
        client.download("https://bucket.s3.example/img.png?X-Amz-Signature=abc", tmp_path / "img.png")
    assert refused.value.code == "unauthorized"
    assert authorization == {"api.example": "Bearer sk-secret", "bucket.s3.example": None}
    assert (tmp_path / "img.png").read_bytes() == b"image bytes"


def test_an_error_page_that_is_not_a_problem_still_becomes_a_darkroom_error() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, html="<html><body>Bad gateway</body></html>", headers={"Retry-After": "3"})

    with DarkroomClient("http://api.example", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(DarkroomError) as caught:
            client.get("gen_1")
    error = caught.value
    assert (error.status, error.code, error.problem.title) == (502, "bad_gateway", "Bad Gateway")
    assert error.retryable and error.retry_after == 3.0
    assert error.detail == "<html><body>Bad gateway</body></html>"


def test_wait_polls_a_queued_job_no_faster_than_its_retry_after() -> None:
    """The server scales Retry-After to the expected wait; the client's poll loop honours it."""
    request = GenerationRequest(prompt="x", seed=1).normalized()
    queued = Job(
        id="gen_1", status=JobStatus.QUEUED, queue_position=3, created_at=datetime.now(UTC), request=request
    )
    done = queued.model_copy(update={"status": JobStatus.SUCCEEDED, "queue_position": None})
    polls: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        polls.append(time.monotonic())
        job, headers = (queued, {"Retry-After": "1"}) if len(polls) < 3 else (done, {})
        return httpx.Response(200, content=job.model_dump_json(), headers=headers)

    with DarkroomClient("http://api.example", transport=httpx.MockTransport(answer)) as client:
        finished = client.wait("gen_1", timeout=30, poll_interval=0.01)
    assert finished.status is JobStatus.SUCCEEDED
    assert len(polls) == 3
    assert all(later - earlier >= 0.95 for earlier, later in zip(polls, polls[1:], strict=False))
