"""Property tests of the request contract: whatever JSON a client sends, validation either refuses it with a
``ValidationError`` or yields a request whose engine arguments respect every limit of the model.

The bodies mix plausible values (so that many of them pass and the limits get checked) with arbitrary JSON
(wrong types, NaN/inf, surrogates, nesting, extra keys), the way a JSON decoder could hand them to us.
"""

from __future__ import annotations

import base64
import io
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from schemas.generation import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    NORMALIZED_CONTEXT,
    SD35_MEDIUM_NUM_LAYERS,
    GenerationRequest,
)
from schemas.jobs import CreateGeneration
from schemas.sizes import ASPECT_RATIO_SIZES, size_problem


def _image_base64(fmt: str, size: tuple[int, int] = (40, 24)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


_PNG = _image_base64("PNG")
_VALID_IMAGES = [
    _PNG,
    _image_base64("JPEG", (300, 500)),
    "data:image/png;base64," + _PNG,
    _PNG[:40] + "\n" + _PNG[40:],
]
_BAD_IMAGES = [
    "",
    "not base64 at all!",
    _PNG[: len(_PNG) // 2],  # truncated base64 (and a truncated PNG)
    base64.b64encode(b"GIF89a" + b"\x00" * 20).decode(),
    _image_base64("GIF"),
    "data:image/png;base64,\ud800",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["\ud800", "\x00", "nan", "inf", "-Infinity", "1e309", "512", "true", " ", "\u200b"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


def plausible(*strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly values near the field's rules, sometimes anything JSON can carry."""
    return st.one_of(*strategies, json_values)


_sides = st.sampled_from([0, 16, 240, 256, 500, 512, 1024, 1040, 2048, 2064, 4096]) | st.integers(-64, 4200)
_unit = st.floats(min_value=-0.5, max_value=1.5, allow_nan=False)
_slg = plausible(
    st.booleans(),
    st.fixed_dictionaries(
        {},
        optional={
            "layers": plausible(st.lists(st.integers(-2, SD35_MEDIUM_NUM_LAYERS + 2), max_size=5)),
            "scale": plausible(st.floats(-1, 12)),
            "start": plausible(_unit),
            "stop": plausible(_unit),
        },
    ),
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "negative_prompt": plausible(st.none(), st.text(max_size=30)),
    "width": plausible(_sides),
    "height": plausible(_sides),
    "aspect_ratio": plausible(st.sampled_from([r.value for r in ASPECT_RATIO_SIZES] + ["4:3", "1:1 "])),
    "seed": plausible(st.none(), st.integers(-5, MAX_SEED + 5), st.sampled_from([0, MAX_SEED, 2**64, -0])),
    "num_inference_steps": plausible(st.integers(-1, 102)),
    "guidance_scale": plausible(st.floats(-1, 21), st.integers(-1, 21)),
    "skip_layer_guidance": _slg,
    "num_images": plausible(st.integers(-1, 10)),
    "output_format": plausible(st.sampled_from(["png", "jpeg", "webp", "gif", "PNG"])),
    "output_quality": plausible(st.none(), st.integers(-1, 101)),
    "max_sequence_length": plausible(st.integers(70, 520)),
    "init_image": plausible(st.sampled_from(_VALID_IMAGES), st.sampled_from(_BAD_IMAGES)),
    "strength": plausible(st.none(), st.floats(-0.5, 1.5), st.just(0)),
}
request_bodies = st.fixed_dictionaries(
    {"prompt": plausible(st.text(min_size=1, max_size=40), st.just("a red fox in the snow"))},
    optional=FIELDS,
)
bodies_with_extras = st.tuples(
    request_bodies, st.dictionaries(st.text(max_size=12), json_values, max_size=2)
).map(lambda pair: {**pair[1], **pair[0]})


def _is_number(value: object, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def assert_within_limits(request: GenerationRequest) -> None:
    """Everything the engine receives from a normalised request is inside the model's limits."""
    kwargs = request.to_pipeline_kwargs()
    prompt = kwargs["prompt"]
    assert isinstance(prompt, str) and prompt.strip() and len(prompt) <= MAX_PROMPT_CHARS
    for text in (prompt, kwargs["negative_prompt"] or ""):
        assert "\x00" not in text
        text.encode("utf-8")  # no lone surrogates
    width, height = kwargs["width"], kwargs["height"]
    assert _is_number(width, int) and _is_number(height, int)
    assert size_problem(width, height) is None
    assert _is_number(kwargs["num_inference_steps"], int) and 1 <= kwargs["num_inference_steps"] <= 100
    guidance = kwargs["guidance_scale"]
    assert _is_number(guidance, float) and math.isfinite(guidance) and 0 <= guidance <= 20
    assert _is_number(kwargs["num_images_per_prompt"], int) and 1 <= kwargs["num_images_per_prompt"] <= 8
    assert _is_number(kwargs["max_sequence_length"], int) and 77 <= kwargs["max_sequence_length"] <= 512
    if kwargs["negative_prompt"]:
        assert guidance > 1
    if "skip_guidance_layers" in kwargs:
        layers = kwargs["skip_guidance_layers"]
        assert guidance > 1
        assert layers and layers == sorted(set(layers))
        assert all(_is_number(layer, int) and 0 <= layer < SD35_MEDIUM_NUM_LAYERS for layer in layers)
        start, stop = kwargs["skip_layer_guidance_start"], kwargs["skip_layer_guidance_stop"]
        assert 0 <= start < stop <= 1
        assert (
            math.isfinite(kwargs["skip_layer_guidance_scale"])
            and 0 <= kwargs["skip_layer_guidance_scale"] <= 10
        )
    if request.is_image_to_image:
        assert 0 < kwargs["strength"] <= 1
    else:
        assert "strength" not in kwargs
    assert request.seed is not None and 0 <= request.seed <= MAX_SEED
    assert all(_is_number(seed, int) and 0 <= seed <= MAX_SEED for seed in request.image_seeds())
    if request.output_format.value == "png":
        assert request.output_quality is None
    else:
        assert request.output_quality is not None and 1 <= request.output_quality <= 100


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies_with_extras)
def test_any_json_body_is_refused_cleanly_or_yields_a_request_within_the_models_limits(
    body: dict[str, Any],
) -> None:
    try:
        request = GenerationRequest.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        assert errors and all(error["msg"] and error["type"] for error in errors)
        return
    normalized = request.normalized()
    assert_within_limits(normalized)
    # What a job stores (the init image goes to storage) is valid JSON, and the worker reads it back as is.
    stored = json.loads(
        json.dumps(normalized.model_dump(mode="json", exclude={"init_image"}), allow_nan=False)
    )
    reread = GenerationRequest.model_validate(stored, context=NORMALIZED_CONTEXT)
    assert reread == normalized.model_copy(update={"init_image": None})
    # Replaying the stored request (what job.request is for) reproduces it, image aside.
    if not normalized.is_image_to_image:
        assert GenerationRequest.model_validate(stored).normalized() == normalized


@settings(max_examples=200, deadline=None)
@given(
    body=request_bodies,
    webhook_url=plausible(st.just("https://hooks.example.com/x"), st.text(max_size=30)),
    webhook_events=plausible(
        st.lists(st.sampled_from(["started", "progress", "completed", "done"]), max_size=4)
    ),
)
def test_any_submission_is_refused_cleanly_or_splits_into_a_valid_generation_request(
    body: dict[str, Any], webhook_url: Any, webhook_events: Any
) -> None:
    try:
        submission = CreateGeneration.model_validate(
            {**body, "webhook_url": webhook_url, "webhook_events": webhook_events}
        )
    except ValidationError:
        return
    assert submission.webhook_events and len(set(submission.webhook_events)) == len(submission.webhook_events)
    assert_within_limits(submission.generation_request().normalized())


_NUMERIC_FIELDS = {
    "seed": {},
    "width": {"height": 512},
    "num_inference_steps": {},
    "guidance_scale": {},
    "num_images": {},
    "output_quality": {"output_format": "jpeg"},
    "max_sequence_length": {},
    "strength": {"init_image": _PNG},
    "skip_layer_guidance.scale": {},
    "skip_layer_guidance.layers": {},
}


@pytest.mark.parametrize("field", sorted(_NUMERIC_FIELDS))
@pytest.mark.parametrize("value", [True, False, "5", "0.5", "nan", [1], {"v": 1}], ids=repr)
def test_numeric_fields_take_json_numbers_only(field: str, value: Any) -> None:
    """JSON Schema's integer/number: ``true`` or ``"512"`` is a client bug to report, not to coerce."""
    body: dict[str, Any] = {"prompt": "a fox", **_NUMERIC_FIELDS[field]}
    name, _, inner = field.partition(".")
    if inner:
        body.update(guidance_scale=4.5, skip_layer_guidance={inner: [value] if inner == "layers" else value})
    else:
        body[name] = value
    with pytest.raises(ValidationError) as caught:
        GenerationRequest.model_validate(body)
    assert {str(error["loc"][0]) for error in caught.value.errors()} == {name}
