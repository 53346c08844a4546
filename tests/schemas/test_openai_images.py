"""OpenAI's image request mapped onto ours: what is honoured, what is refused (and why), what is ignored."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from schemas.generation import GenerationRequest
from schemas.jobs import CreateGeneration
from schemas.openai_images import (
    STANDARD_SIZES,
    ImageGenerationRequest,
    openai_error,
    openai_field_errors,
    served_model_name,
)
from schemas.problems import FieldError, Problem
from schemas.sizes import size_problem


def request(**fields: Any) -> ImageGenerationRequest:
    return ImageGenerationRequest.model_validate({"prompt": "a red fox", **fields})


def refusal(**fields: Any) -> tuple[str, str]:
    """(field, message) of the one error ``fields`` cause."""
    with pytest.raises(ValidationError) as caught:
        request(**fields)
    (error,) = caught.value.errors()
    return ".".join(map(str, error["loc"])), error["msg"]


def test_a_bare_request_is_a_bare_generation_with_our_defaults() -> None:
    generation = request().generation()
    assert generation.model_dump(exclude_unset=True) == {"prompt": "a red fox"}
    assert generation.generation_request().normalized().resolved_size() == (1024, 1024)
    assert request(size="auto", quality="auto", n=None).generation() == generation


def test_fields_map_onto_the_generation_request() -> None:
    generation = request(
        n=3,
        size="1792x1024",
        quality="hd",
        output_format="webp",
        output_compression=0,
        seed=11,
        negative_prompt="blur",
        guidance_scale=6,
    ).generation()
    assert generation.model_dump(exclude_unset=True) == {
        "prompt": "a red fox",
        "num_images": 3,
        "width": 1792,
        "height": 1024,
        "num_inference_steps": 50,
        "output_format": "webp",
        "output_quality": 1,  # OpenAI's 0..100 onto our 1..100
        "seed": 11,
        "negative_prompt": "blur",
        "guidance_scale": 6,
    }
    assert isinstance(generation, CreateGeneration)


@pytest.mark.parametrize(("quality", "steps"), [("low", 20), ("medium", 40), ("high", 50), ("max", 80)])
def test_quality_presets_the_step_count(quality: str, steps: int) -> None:
    assert request(quality=quality).generation().num_inference_steps == steps
    assert request(num_inference_steps=7).generation().num_inference_steps == 7


def test_every_standard_size_is_drawn_as_asked_and_256_is_refused_with_the_list() -> None:
    for size in STANDARD_SIZES:
        width, height = map(int, size.split("x"))
        assert size_problem(width, height) is None
        generation = request(size=size).generation()
        assert (generation.width, generation.height) == (width, height)
    field, message = refusal(size="256x256")
    assert field == "size" and "0.07 megapixels" in message and ", ".join(STANDARD_SIZES) in message


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"size": "1000x1000"}, "size", "not a multiple of 16"),
        ({"size": "1024"}, "size", "not 'auto' or WIDTHxHEIGHT"),
        ({"size": "4096x4096"}, "size", "outside 256..2048"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"n": 9}, "n", "less than or equal to 8"),
        ({"n": True}, "n", "not a boolean"),
        ({"n": "2"}, "n", "not a string"),
        ({"output_format": "gif"}, "output_format", "gif output is not supported"),
        ({"output_format": "svg"}, "output_format", "svg output is not supported"),
        ({"output_compression": 50}, "output_compression", "jpeg and webp only"),
        ({"background": "transparent"}, "background", "images are opaque"),
        ({"stream": True}, "stream", "/v1/generations/{id}/events"),
        ({"partial_images": 2}, "partial_images", "needs streaming"),
        ({"quality": "ultra"}, "quality", "Input should be"),
        ({"response_format": "png"}, "response_format", "Input should be"),
        ({"quality": "low", "num_inference_steps": 8}, "num_inference_steps", "not both"),
        ({"num_inference_steps": 101}, "num_inference_steps", "less than or equal to 100"),
        ({"seed": 2**32}, "seed", "less than or equal to 4294967295"),
        ({"complexity": "high"}, "complexity", "Extra inputs are not permitted"),
    ],
)
def test_what_cannot_be_honoured_is_refused_with_a_reason(
    fields: dict[str, Any], field: str, says: str
) -> None:
    where, message = refusal(**fields)
    assert (where, says in message) == (field, True), message


def test_hints_are_accepted_and_change_nothing() -> None:
    hinted = request(
        style="vivid",
        moderation="low",
        user="u-1",
        safety_identifier="hash",
        background="opaque",
        stream=False,
        partial_images=0,
        response_format="url",
    )
    assert hinted.generation() == request().generation()
    assert hinted.wants_url and not request().wants_url  # b64_json by default, as for GPT image models


def test_the_ranges_are_the_generation_requests_own() -> None:
    ours = GenerationRequest.model_json_schema()["properties"]
    theirs = ImageGenerationRequest.model_json_schema()["properties"]
    assert (theirs["n"]["anyOf"][0]["maximum"], theirs["n"]["anyOf"][0]["minimum"]) == (
        ours["num_images"]["maximum"],
        ours["num_images"]["minimum"],
    )
    assert theirs["num_inference_steps"]["anyOf"][0]["maximum"] == ours["num_inference_steps"]["maximum"]


def test_generation_errors_are_reported_under_the_openai_field_names() -> None:
    with pytest.raises(ValidationError) as caught:
        request(prompt=" \t ").generation()
    assert [(e["loc"], e["msg"]) for e in openai_field_errors(caught.value)] == [
        (("body", "prompt"), "Value error, prompt must contain non-blank text")
    ]
    with pytest.raises(ValidationError) as caught:
        CreateGeneration.model_validate({"prompt": "x", "num_images": 0, "width": 100, "height": 512})
    assert [e["loc"] for e in openai_field_errors(caught.value)] == [("body", "size"), ("body", "n")]
    assert all("input" not in e for e in openai_field_errors(caught.value))


def test_a_model_is_a_served_one_or_our_alias_for_the_default() -> None:
    served = ("stabilityai/stable-diffusion-3.5-medium", "sd3.5-large")
    assert served_model_name("sd3.5-large", served) == "sd3.5-large"
    assert served_model_name("sd3.5-medium", served) == "stabilityai/stable-diffusion-3.5-medium"
    assert served_model_name("stabilityai/stable-diffusion-3.5-medium", served) == served[0]
    assert served_model_name("dall-e-3", served) is None
    # A served model that happens to be called like the alias is itself, not the default.
    assert served_model_name("sd3.5-medium", ("tiny", "sd3.5-medium")) == "sd3.5-medium"


def test_the_openai_error_member_carries_the_whole_story() -> None:
    problem = Problem(
        type="urn:darkroom:problem:validation_error",
        title="Unprocessable Content",
        status=422,
        detail="The request has 1 invalid field: size.",
        code="validation_error",
        errors=[FieldError(field="size", message="size 100x100 cannot be generated", type="value_error")],
    )
    assert openai_error(problem).model_dump() == {
        "message": "The request has 1 invalid field: size. size: size 100x100 cannot be generated",
        "type": "invalid_request_error",
        "param": "size",
        "code": "validation_error",
    }
    outage = Problem(
        type="urn:darkroom:problem:queue_full", title="Service Unavailable", status=503, code="queue_full"
    )
    assert openai_error(outage).model_dump() == {
        "message": "Service Unavailable",
        "type": "server_error",
        "param": None,
        "code": "queue_full",
    }


def test_the_openai_error_message_says_a_cause_the_detail_already_says_once() -> None:
    said = "model 'dall-e-3' is not served here; served: 'tiny' (GET /v1/models), or omit it"
    problem = Problem(
        type="urn:darkroom:problem:model_not_found",
        title="Unprocessable Content",
        status=422,
        detail=said,
        code="model_not_found",
        errors=[
            FieldError(field="model", message=said, type="model_not_found"),
            FieldError(field="n", message="n must be at most 8", type="value_error"),
        ],
    )
    error = openai_error(problem)
    assert error.message == said + " n: n must be at most 8"
    assert error.param == "model"
