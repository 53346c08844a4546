"""Content safety end to end: a real stack (Redis, uvicorn API, tiny-model worker, file storage) with a
prompt blocklist on the API and a test image classifier in the worker.

The classifier is test code, not product code: it lives in a module put on the worker's ``PYTHONPATH``
only, named by ``DARKROOM_IMAGE_CLASSIFIER`` as an operator would name theirs. It checks it was handed a
real decoded image of the job's size, then follows instructions in the prompt — ``[filter:1]`` withholds
image 1, ``[crash]`` raises — so every assertion below is about one known image.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from services.jobs import job_key
from tests.fixtures.stack import ONE_THREAD, TINY_QUEUE, Stack, start_stack

SMALL: dict[str, Any] = {"width": 512, "height": 512, "num_inference_steps": 2}
BLOCKLIST = "nsfw, x rated, re:g[o0]re+"

CLASSIFIER = '''
"""Test-only image classifier (tests/api/test_content_safety.py)."""
import re

from PIL import Image

from services.content_safety import ALLOWED, filtered


def classify(image, request, index):
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise TypeError(f"expected an RGB PIL image, got {image!r}")
    if image.size != (request.width, request.height):
        raise ValueError(f"image {image.size} is not the requested size")
    if "[crash]" in request.prompt:
        raise RuntimeError("classifier exploded")
    marked = re.search(r"\\[filter:([0-9,]+)\\]", request.prompt)
    if marked and str(index) in marked.group(1).split(","):
        return filtered("test-category")
    return ALLOWED
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack-content-safety")
    hooks = tmp / "hooks"
    hooks.mkdir()
    (hooks / "darkroom_test_classifier.py").write_text(CLASSIFIER)
    yield from start_stack(
        tmp,
        f"file://{tmp / 'outputs'}",
        tiny_model_dir,
        extra_env={"DARKROOM_PROMPT_BLOCKLIST": BLOCKLIST},
        process_env={
            "worker": {
                **ONE_THREAD["worker"],
                "PYTHONPATH": str(hooks),
                "DARKROOM_IMAGE_CLASSIFIER": "darkroom_test_classifier:classify",
            }
        },
    )


def stored_files(stack: Stack, job_id: str) -> list[str]:
    outputs = Path(stack.env["DARKROOM_STORAGE_URL"].removeprefix("file://"))
    return sorted(path.name for path in outputs.rglob("*") if path.is_file() and job_id in str(path))


def job_count(stack: Stack) -> int:
    return sum(1 for _ in stack.redis().scan_iter(job_key("*")))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "an NSFW fox"}, "prompt"),
        ({"prompt": "an ｎｓｆｗ fox"}, "prompt"),  # full-width letters
        ({"prompt": "a n\u200bsfw fox"}, "prompt"),  # a zero-width space inside
        ({"prompt": "an X-Rated fox"}, "prompt"),
        ({"prompt": "a g0reee fox"}, "prompt"),
    ],
)
def test_a_blocked_prompt_is_refused_and_nothing_is_queued(
    stack: Stack, body: dict[str, Any], field: str
) -> None:
    before = job_count(stack)
    with stack.client() as client:
        answer = client.post("/v1/generations", json={**SMALL, **body})
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["code"] == "content_filtered"
    assert problem["type"] == "urn:darkroom:problem:content_filtered"
    assert problem["errors"] == [
        {
            "field": field,
            "message": f"{field} contains a term this service does not accept",
            "type": "content_filtered",
        }
    ]
    assert "nsfw" not in answer.text.lower() and "rated" not in answer.text.lower()  # the term is not echoed
    assert job_count(stack) == before
    assert stack.redis().llen(TINY_QUEUE) == 0


def test_an_allowed_prompt_runs_and_a_negative_prompt_may_name_blocked_terms(stack: Stack) -> None:
    # "classic" holds no blocked *word*; a negative prompt steers away, so it is not checked by default.
    body = {**SMALL, "prompt": "a classic red fox", "negative_prompt": "nsfw, x-rated", "seed": 3}
    with stack.client() as client:
        answer = client.post("/v1/generations", json=body, headers={"Prefer": "wait=60"})
        assert answer.status_code == 200, answer.text
        job = answer.json()
        assert job["status"] == "succeeded"
        [image] = job["images"]
        assert image["finish_reason"] == "stop" and image["url"] and image["filter_reason"] is None
        assert job["warnings"] == []


def test_a_filtered_image_is_reported_and_never_stored(stack: Stack) -> None:
    body = {**SMALL, "prompt": "two foxes [filter:1]", "num_images": 2, "seed": 11}
    with stack.client() as client:
        answer = client.post("/v1/generations", json=body, headers={"Prefer": "wait=60"})
        assert answer.status_code == 200, answer.text
        job = answer.json()
        assert job["status"] == "succeeded", job
        kept, withheld = job["images"]
        assert kept["finish_reason"] == "stop" and kept["seed"] == 11 and kept["filter_reason"] is None
        download = httpx.get(kept["url"], timeout=10)
        assert download.status_code == 200
        with Image.open(io.BytesIO(download.content)) as image:
            assert image.size == (512, 512)
        assert withheld == {
            "url": None,
            "seed": 12,
            "width": 512,
            "height": 512,
            "content_type": "image/png",
            "sha256": None,
            "finish_reason": "content_filtered",
            "filter_reason": "test-category",
        }
        assert job["warnings"] == [
            "1 of 2 images were withheld by the content filter (finish_reason content_filtered)"
        ]
        later_kept, later_withheld = client.get(f"/v1/generations/{job['id']}").json()["images"]
        assert later_withheld == withheld and later_kept["sha256"] == kept["sha256"]  # a later read
    assert stored_files(stack, job["id"]) == ["0.png"]  # image 1 exists nowhere


def test_a_classifier_crash_fails_the_job(stack: Stack) -> None:
    with stack.client() as client:
        answer = client.post("/v1/generations", json={**SMALL, "prompt": "a fox [crash]"})
    job = stack.wait_for(answer.json()["id"], {"succeeded", "failed", "canceled"})
    assert job["status"] == "failed"
    assert job["error"]["type"] == "content_check_failed"
    assert "RuntimeError" in job["error"]["message"] and job["images"] == []
    assert stored_files(stack, job["id"]) == []


def test_the_openai_endpoint_marks_filtered_images_and_refuses_blocked_prompts(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0)
    extra = {"num_inference_steps": 2, "seed": 5}
    result = client.images.generate(prompt="foxes [filter:0]", n=2, size="512x512", extra_body=extra)
    assert result.data is not None
    first, second = (entry.model_dump() for entry in result.data)
    assert first["b64_json"] is None and first["url"] is None
    assert first["finish_reason"] == "content_filtered" and first["seed"] == 5
    assert second["finish_reason"] == "stop" and second["seed"] == 6
    with Image.open(io.BytesIO(base64.b64decode(second["b64_json"]))) as image:
        assert image.size == (512, 512)

    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.images.generate(prompt="one fox [filter:0]", size="512x512", extra_body=extra)
    assert refused.value.code == "content_filtered"
    assert refused.value.response.headers["location"].startswith("/v1/generations/")
    assert "withheld the image" in refused.value.message

    with pytest.raises(openai.UnprocessableEntityError) as blocked:
        client.images.generate(prompt="an NSFW fox", size="512x512", extra_body=extra)
    assert blocked.value.code == "content_filtered"
    assert blocked.value.param == "prompt"
