"""``POST /v1/images/generations`` driven by the real ``openai`` SDK, against a running stack with keys on.

One stack (Redis, API under uvicorn, tiny-model worker, file storage) serves the module; the timeout and
cancel paths use an in-process API with no worker, where jobs simply wait in the queue.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from PIL import Image

from api.main import create_app
from services.api_keys import hash_key, new_key
from services.queue import generation_queue_name
from services.settings import DEFAULT_MODEL, Settings
from tests.api import serve
from tests.fixtures.stack import Stack, api_stack

ALICE, BOB = new_key(), new_key()
FAST: dict[str, Any] = {"num_inference_steps": 2}  # extra_body: the tiny model needs no more


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, shared_backend: Stack) -> Iterator[Stack]:
    keys = f"alice:sha256:{hash_key(ALICE)},bob:sha256:{hash_key(BOB)}"
    env = {"DARKROOM_AUTH_DISABLED": "false", "DARKROOM_API_KEYS": keys}
    yield from api_stack(shared_backend, tmp_path_factory.mktemp("stack-openai"), env)


def sdk(url: str, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=60)


def api(url: str, key: str = ALICE) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def image_of(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_b64_json_images_are_the_jobs_images_and_the_job_belongs_to_the_key(stack: Stack) -> None:
    with sdk(stack.api_url) as client:
        result = client.images.generate(
            model="sd3.5-medium",
            prompt="a red fox in the snow",
            n=2,
            size="512x512",
            response_format="b64_json",
            extra_body={**FAST, "seed": 7},
        )
    assert result.data is not None and len(result.data) == 2
    pngs = [base64.b64decode(item.b64_json or "") for item in result.data]
    for png in pngs:
        image = image_of(png)
        assert (image.format, image.size, image.mode) == ("PNG", (512, 512), "RGB")
    assert pngs[0] != pngs[1]
    assert [item.url for item in result.data] == [None, None]
    assert (result.size, result.output_format, result.background) == ("512x512", "png", "opaque")
    assert abs(result.created - time.time()) < 120
    extras = result.model_extra or {}
    job_id = extras["id"]
    assert [item.model_extra and item.model_extra["seed"] for item in result.data] == [7, 8]

    with api(stack.api_url) as alice, api(stack.api_url, BOB) as bob:
        job = alice.get(f"/v1/generations/{job_id}").json()
        assert bob.get(f"/v1/generations/{job_id}").status_code == 404
    assert job["status"] == "succeeded"
    assert job["request"]["num_images"] == 2 and job["request"]["seed"] == 7
    assert [httpx.get(image["url"]).content for image in job["images"]] == pngs


def test_url_images_download_through_their_signed_urls(stack: Stack) -> None:
    with sdk(stack.api_url) as client:
        result = client.images.generate(
            model="tiny",  # the configured DARKROOM_MODEL is accepted too
            prompt="a lighthouse at dusk",
            size="768x512",
            response_format="url",
            output_format="jpeg",
            output_compression=80,
            quality="auto",
            style="natural",
            moderation="low",
            user="end-user-42",
            extra_body=FAST,
        )
    assert result.data is not None and len(result.data) == 1
    url = result.data[0].url
    assert url is not None and result.data[0].b64_json is None
    assert "signature=" in url  # a capability: downloads need no API key
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert image_of(response.content).size == (768, 512)
    assert (result.size, result.output_format) == ("768x512", "jpeg")


def test_refusals_are_typed_sdk_exceptions_carrying_our_message(stack: Stack) -> None:
    with sdk(stack.api_url) as client:
        with pytest.raises(openai.UnprocessableEntityError) as bad_size:
            client.images.generate(prompt="a fox", size="1000x1000")
        assert "width 1000 is not a multiple of 16" in bad_size.value.message
        assert (bad_size.value.param, bad_size.value.code) == ("size", "validation_error")

        with pytest.raises(openai.UnprocessableEntityError) as too_small:
            client.images.generate(prompt="a fox", size="256x256")
        assert "1024x1024" in too_small.value.message  # the sizes that work are listed

        with pytest.raises(openai.UnprocessableEntityError) as bad_model:
            client.images.generate(prompt="a fox", model="dall-e-3")
        assert bad_model.value.code == "model_not_found" and bad_model.value.param == "model"
        assert "'sd3.5-medium'" in bad_model.value.message
        assert bad_model.value.message.count("is not served here") == 1  # said once, not detail + field

        with pytest.raises(openai.UnprocessableEntityError) as too_many:
            client.images.generate(prompt="a fox", n=9)
        assert too_many.value.param == "n" and "less than or equal to 8" in too_many.value.message

        with pytest.raises(openai.UnprocessableEntityError) as transparent:
            client.images.generate(prompt="a fox", background="transparent")
        assert "transparent backgrounds are not supported" in transparent.value.message

    with (
        sdk(stack.api_url, key="drk_not-a-key") as stranger,
        pytest.raises(openai.AuthenticationError) as denied,
    ):
        stranger.images.generate(prompt="a fox")
    assert "invalid API key" in denied.value.message and denied.value.code == "unauthorized"


def test_errors_are_problem_details_with_an_openai_error_member(stack: Stack) -> None:
    with api(stack.api_url) as client:
        response = client.post("/v1/images/generations", json={"prompt": "   ", "size": "auto"})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["type"] == "urn:darkroom:problem:validation_error"
    assert problem["errors"][0]["field"] == "prompt"
    assert problem["error"] == {
        "message": problem["detail"] + " prompt: prompt must contain non-blank text",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "validation_error",
    }
    with httpx.Client(base_url=stack.api_url) as anonymous:  # the key check answers in the same shape
        denied = anonymous.post("/v1/images/generations", json={"prompt": "a fox"}).json()
    assert denied["code"] == "unauthorized" and denied["error"]["type"] == "invalid_request_error"
    with api(stack.api_url) as client:  # and only here: native routes keep plain problem details
        assert "error" not in client.get("/v1/generations/gen_nope").json()


# --- no worker: jobs wait in the queue ------------------------------------------------------------------


@pytest.fixture
def idle_api(redis_url: str, tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path}",
        auth_disabled=True,
        openai_images_wait=timedelta(seconds=2),
    )
    with serve(create_app(settings), lifespan="on") as url:
        yield url


def queued_jobs(redis_url: str) -> list[str]:
    with redis.Redis.from_url(redis_url) as connection:
        # The in-process API serves the default model: its queue is that model's.
        queue = generation_queue_name(Settings(model=DEFAULT_MODEL))
        return [job_id.decode() for job_id in connection.lrange(f"rq:queue:{queue}", 0, -1)]


def test_a_job_not_done_in_time_is_a_504_naming_it_and_the_sdk_does_not_resubmit(
    idle_api: str, redis_url: str
) -> None:
    headers = {"Idempotency-Key": "poster-1"}
    with sdk(idle_api, key="unused") as client:  # default max_retries=2: it would retry a plain 5xx
        with pytest.raises(openai.InternalServerError) as timeout:
            client.images.generate(prompt="a fox", size="512x512", extra_headers=headers)
        (job_id,) = queued_jobs(redis_url)
        assert timeout.value.status_code == 504 and timeout.value.code == "generation_timeout"
        assert f"job {job_id} did not finish within 2 s" in timeout.value.message
        assert timeout.value.response.headers["location"] == f"/v1/generations/{job_id}"
        assert timeout.value.response.headers["x-should-retry"] == "false"

        with pytest.raises(openai.InternalServerError) as again:  # same key: waits for the same job
            client.images.generate(prompt="a fox", size="512x512", extra_headers=headers)
        assert job_id in again.value.message
    assert queued_jobs(redis_url) == [job_id]


def test_a_job_canceled_while_waited_for_is_a_409_without_retries(idle_api: str, redis_url: str) -> None:
    outcome: dict[str, BaseException] = {}

    def generate() -> None:
        with sdk(idle_api, key="unused") as client:
            try:
                client.images.generate(prompt="a fox", size="512x512")
            except openai.APIStatusError as exc:
                outcome["error"] = exc

    caller = threading.Thread(target=generate)
    caller.start()
    deadline = time.monotonic() + 10
    while not (jobs := queued_jobs(redis_url)):
        assert time.monotonic() < deadline, "the job was never queued"
        time.sleep(0.02)
    with httpx.Client(base_url=idle_api) as client:
        assert client.post(f"/v1/generations/{jobs[0]}/cancel").status_code == 200
    caller.join(timeout=10)
    error = outcome["error"]
    assert isinstance(error, openai.ConflictError) and error.code == "canceled"
    assert f"job {jobs[0]} canceled" in error.message
    assert queued_jobs(redis_url) == []  # canceled, and not submitted again by an SDK retry
