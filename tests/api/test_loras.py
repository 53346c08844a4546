"""LoRA adapters through the whole service: the API checks names against DARKROOM_LORAS, the worker
applies exactly the job's adapters (real Redis, API, tiny-model worker with two tiny LoRAs, file storage)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.fixtures.stack import Stack, api_stack

SMALL: dict[str, Any] = {
    "prompt": "a red fox in the snow",
    "width": 512,
    "height": 512,
    "num_inference_steps": 2,
    "guidance_scale": 1.0,
    "seed": 21,
}


@pytest.fixture(scope="module")
def lora_stack(
    tmp_path_factory: pytest.TempPathFactory, shared_backend: Stack, tiny_loras: dict[str, str]
) -> Iterator[Stack]:
    env = {"DARKROOM_LORAS": json.dumps(tiny_loras)}  # the list the shared worker was started with
    yield from api_stack(shared_backend, tmp_path_factory.mktemp("stack-loras"), env)


def run(stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    with stack.client() as client:
        response = client.post("/v1/generations", json=body, headers={"Prefer": "wait=60"})
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    assert job["status"] == "succeeded", job
    return job


def pixels(job: dict[str, Any]) -> np.ndarray:
    response = httpx.get(job["images"][0]["url"], timeout=10)
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_job_with_a_lora_differs_from_the_same_seed_without_and_the_next_job_is_clean(
    lora_stack: Stack,
) -> None:
    plain = run(lora_stack, SMALL)
    styled = run(lora_stack, {**SMALL, "loras": [{"name": "ink", "scale": 0.9}]})
    after = run(lora_stack, SMALL)
    assert styled["request"]["loras"] == [{"name": "ink", "scale": 0.9}]
    assert plain["request"]["loras"] == []
    assert np.abs(pixels(styled) - pixels(plain)).max() > 40
    assert after["images"][0]["sha256"] == plain["images"][0]["sha256"]


def test_an_unknown_lora_is_422_naming_its_field_and_listing_what_is_offered(lora_stack: Stack) -> None:
    body = {**SMALL, "loras": [{"name": "ink"}, {"name": "sepia"}]}
    with lora_stack.client() as client:
        single = client.post("/v1/generations", json=body)
        batch = client.post("/v1/batches", json={"requests": [SMALL, body]})
    for response, field in ((single, "loras.1.name"), (batch, "requests.1.loras.1.name")):
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["code"] == "lora_not_found"
        assert [error["field"] for error in problem["errors"]] == [field]
        assert "offers: ink, rust" in problem["errors"][0]["message"]


def test_the_openai_endpoint_takes_loras_as_an_extension(lora_stack: Stack) -> None:
    sdk = openai.OpenAI(base_url=f"{lora_stack.api_url}/v1", api_key="unused", timeout=60)
    extra = {key: SMALL[key] for key in ("seed", "num_inference_steps", "guidance_scale")}
    styled = sdk.images.generate(
        prompt=SMALL["prompt"], size="512x512", extra_body={**extra, "loras": [{"name": "ink", "scale": 0.9}]}
    )
    with lora_stack.client() as client:
        job = client.get(f"/v1/generations/{(styled.model_extra or {})['id']}").json()
    assert job["request"]["loras"] == [{"name": "ink", "scale": 0.9}]
    reference = run(lora_stack, {**SMALL, "loras": [{"name": "ink", "scale": 0.9}]})
    assert job["images"][0]["sha256"] == reference["images"][0]["sha256"]
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.images.generate(prompt="x", extra_body={**extra, "loras": [{"name": "sepia"}]})
    assert (refused.value.code, refused.value.param) == ("lora_not_found", "loras.0.name")
