"""The request contract: every limit of the model is enforced at the edge, with the field named."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from schemas.generation import MAX_SEED, NORMALIZED_CONTEXT, GenerationRequest, SkipLayerGuidance
from schemas.sizes import ASPECT_RATIO_SIZES, AspectRatio, size_problem


def errors_of(**fields: Any) -> list[tuple[tuple[str | int, ...], str]]:
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(**fields)
    return [(tuple(error["loc"]), error["msg"]) for error in caught.value.errors()]


def only_error_field(**fields: Any) -> str:
    errors = errors_of(**fields)
    assert len(errors) == 1, errors
    return ".".join(str(part) for part in errors[0][0])


def png_base64(width: int = 64, height: int = 48, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("ratio", "size"),
    [
        ("1:1", (1024, 1024)),
        ("16:9", (1344, 768)),
        ("21:9", (1536, 640)),
        ("2:3", (832, 1216)),
        ("3:2", (1216, 832)),
        ("4:5", (896, 1088)),
        ("5:4", (1088, 896)),
        ("9:16", (768, 1344)),
        ("9:21", (640, 1536)),
    ],
)
def test_each_aspect_ratio_preset_resolves_to_its_documented_size(ratio: str, size: tuple[int, int]) -> None:
    request = GenerationRequest(prompt="a fox", aspect_ratio=ratio).normalized()
    assert (request.width, request.height) == size
    assert request.width % 64 == 0 and request.height % 64 == 0
    assert 0.9 <= request.width * request.height / 1024**2 <= 1.05
    num, den = (int(part) for part in ratio.split(":"))
    assert abs(request.width / request.height - num / den) / (num / den) < 0.05


def test_the_preset_table_covers_stabilitys_set_exactly() -> None:
    assert {ratio.value for ratio in ASPECT_RATIO_SIZES} == {ratio.value for ratio in AspectRatio}
    assert len(AspectRatio) == 9


def test_default_size_is_one_megapixel_square() -> None:
    request = GenerationRequest(prompt="a fox").normalized()
    assert (request.width, request.height) == (1024, 1024)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"width": 1000, "height": 1024}, "width"),
        ({"width": 1024, "height": 1000}, "height"),
        ({"width": 240, "height": 1024}, "width"),
        ({"width": 2064, "height": 512}, "width"),
        ({"width": 1024, "height": 2048 + 16}, "height"),
        ({"width": 2048, "height": 2048}, "height"),  # sides fine, 4.2 MP too many
        ({"width": 256, "height": 256}, "height"),  # 0.07 MP too few
        ({"width": 1024}, "height"),
        ({"height": 1024}, "height"),
        ({"width": 1024, "height": 1024, "aspect_ratio": "1:1"}, "aspect_ratio"),
        ({"aspect_ratio": "7:5"}, "aspect_ratio"),
        ({"width": True, "height": 1024}, "width"),
    ],
)
def test_bad_sizes_are_rejected_naming_the_field(fields: dict[str, Any], field: str) -> None:
    assert only_error_field(prompt="a fox", **fields) == field


def test_size_errors_say_why() -> None:
    [(_, message)] = errors_of(prompt="x", width=1000, height=1024)
    assert "multiple of 16" in message
    [(_, message)] = errors_of(prompt="x", width=2048, height=2048)
    assert "megapixels" in message


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**64, True])
def test_out_of_range_seeds_are_rejected(seed: int) -> None:
    assert only_error_field(prompt="a fox", seed=seed) == "seed"


@pytest.mark.parametrize("seed", [0, 7, MAX_SEED])
def test_seed_bounds_are_inclusive(seed: int) -> None:
    assert GenerationRequest(prompt="a fox", seed=seed).seed == seed


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   \n\t"}, "prompt"),
        ({"prompt": "a\x00b"}, "prompt"),
        ({"prompt": "a \ud800 b"}, "prompt"),
        ({"prompt": "x", "negative_prompt": "\udfff"}, "negative_prompt"),
        ({"prompt": "x" * 10_001}, "prompt"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 101}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": -0.5}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": 20.5}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": float("inf")}, "guidance_scale"),
        ({"prompt": "x", "num_images": 0}, "num_images"),
        ({"prompt": "x", "num_images": 9}, "num_images"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "output_format": "png", "output_quality": 80}, "output_quality"),
        ({"prompt": "x", "output_format": "jpeg", "output_quality": 0}, "output_quality"),
        ({"prompt": "x", "max_sequence_length": 76}, "max_sequence_length"),
        ({"prompt": "x", "max_sequence_length": 513}, "max_sequence_length"),
        ({"prompt": "x", "skip_layer_guidance": True, "guidance_scale": 1.0}, "skip_layer_guidance"),
        ({"prompt": "x", "skip_layer_guidance": {"layers": [24]}}, "skip_layer_guidance.layers.0"),
        ({"prompt": "x", "skip_layer_guidance": {"layers": [7, 7]}}, "skip_layer_guidance.layers"),
        ({"prompt": "x", "skip_layer_guidance": {"start": 0.5, "stop": 0.2}}, "skip_layer_guidance"),
        ({"prompt": "x", "strength": 0.5}, "strength"),
        ({"prompt": "x", "init_image": png_base64(), "strength": 0}, "strength"),
        ({"prompt": "x", "init_image": png_base64(), "strength": 1.5}, "strength"),
        ({"prompt": "x", "seeed": 3}, "seeed"),
    ],
)
def test_every_other_limit_is_enforced(fields: dict[str, Any], field: str) -> None:
    assert only_error_field(**fields) == field


def test_negative_prompt_without_guidance_is_refused_not_ignored() -> None:
    [(loc, message)] = errors_of(prompt="x", negative_prompt="blur", guidance_scale=1.0)
    assert "guidance_scale" in message


def test_skip_layer_guidance_true_means_the_documented_sd35m_settings() -> None:
    request = GenerationRequest(prompt="x", skip_layer_guidance=True)
    assert request.skip_layer_guidance == SkipLayerGuidance(layers=[7, 8, 9], scale=2.8, start=0.01, stop=0.2)
    assert GenerationRequest(prompt="x", skip_layer_guidance=False).skip_layer_guidance is None
    assert GenerationRequest(prompt="x").skip_layer_guidance is None
    kwargs = request.normalized().to_pipeline_kwargs()
    assert kwargs["skip_guidance_layers"] == [7, 8, 9]
    assert kwargs["skip_layer_guidance_scale"] == 2.8
    assert (kwargs["skip_layer_guidance_start"], kwargs["skip_layer_guidance_stop"]) == (0.01, 0.2)


class TestInitImage:
    def test_a_valid_image_is_accepted_and_sets_the_default_size(self) -> None:
        request = GenerationRequest(prompt="x", init_image=png_base64(640, 480)).normalized()
        assert (request.width, request.height) == (640, 480)
        assert request.strength == 0.6

    def test_a_data_url_is_accepted(self) -> None:
        GenerationRequest(prompt="x", init_image="data:image/png;base64," + png_base64())

    def test_a_large_image_is_fitted_to_about_one_megapixel(self) -> None:
        request = GenerationRequest(prompt="x", init_image=png_base64(3000, 2000, "JPEG")).normalized()
        assert request.width is not None and request.height is not None
        assert size_problem(request.width, request.height) is None
        assert abs(request.width / request.height - 1.5) < 0.05

    @pytest.mark.parametrize(
        ("value", "needle"),
        [
            ("not base64!!", "base64"),
            (base64.b64encode(b"plain text, not an image").decode(), "not an image"),
            (png_base64()[: len(png_base64()) // 2 // 4 * 4], "decoded"),  # truncated file
            (base64.b64encode(b"").decode(), "empty"),
        ],
    )
    def test_broken_images_are_rejected(self, value: str, needle: str) -> None:
        [(loc, message)] = errors_of(prompt="x", init_image=value)
        assert loc == ("init_image",)
        assert needle in message

    def test_decompression_bombs_are_rejected_before_decoding(self) -> None:
        buffer = io.BytesIO()
        Image.new("1", (5000, 5000)).save(buffer, format="PNG")  # tiny file, 25 MP once decoded
        [(loc, message)] = errors_of(prompt="x", init_image=base64.b64encode(buffer.getvalue()).decode())
        assert loc == ("init_image",) and "pixels" in message

    def test_gif_is_not_accepted(self) -> None:
        [(loc, message)] = errors_of(prompt="x", init_image=png_base64(fmt="GIF"))
        assert "format GIF" in message


class TestMaskImage:
    def test_a_mask_of_the_init_images_size_makes_an_inpainting_request(self) -> None:
        request = GenerationRequest(
            prompt="x", init_image=png_base64(640, 480), mask_image=png_base64(640, 480, "WEBP")
        ).normalized()
        assert request.is_inpainting and request.is_image_to_image
        assert (request.width, request.height, request.strength) == (640, 480, 0.6)
        assert request.to_pipeline_kwargs()["strength"] == 0.6

    def test_a_data_url_mask_is_accepted(self) -> None:
        request = GenerationRequest(
            prompt="x", init_image=png_base64(), mask_image="data:image/jpeg;base64," + png_base64(fmt="JPEG")
        )
        assert request.is_inpainting

    def test_a_mask_without_an_init_image_is_refused_naming_mask_image(self) -> None:
        [(loc, message)] = errors_of(prompt="x", mask_image=png_base64())
        assert loc == ("mask_image",) and "init_image" in message

    def test_a_mask_of_another_size_is_refused(self) -> None:
        [(loc, message)] = errors_of(
            prompt="x", init_image=png_base64(640, 480), mask_image=png_base64(640, 481)
        )
        assert loc == ("mask_image",)
        assert "640x481" in message and "640x480" in message

    @pytest.mark.parametrize(
        ("value", "needle"),
        [
            ("not base64!!", "base64"),
            (base64.b64encode(b"plain text, not an image").decode(), "not an image"),
            (png_base64(fmt="GIF"), "format GIF"),
        ],
    )
    def test_a_broken_mask_is_refused_like_a_broken_init_image(self, value: str, needle: str) -> None:
        [(loc, message)] = errors_of(prompt="x", init_image=png_base64(), mask_image=value)
        assert loc == ("mask_image",) and needle in message

    def test_a_broken_init_image_is_reported_once_not_again_through_the_mask(self) -> None:
        assert (
            only_error_field(prompt="x", init_image="not base64!!", mask_image=png_base64()) == "init_image"
        )

    def test_the_worker_reads_a_stored_request_whose_images_are_in_storage(self) -> None:
        stored = {"prompt": "x", "strength": 0.9, "width": 512, "height": 512, "seed": 1}
        request = GenerationRequest.model_validate(stored, context=NORMALIZED_CONTEXT)
        inpaint = request.model_copy(update={"init_image": png_base64(), "mask_image": png_base64()})
        assert inpaint.is_inpainting and inpaint.to_pipeline_kwargs()["strength"] == 0.9


class TestNormalization:
    def test_an_omitted_seed_is_drawn_server_side(self) -> None:
        seeds = {GenerationRequest(prompt="x").normalized().seed for _ in range(20)}
        assert None not in seeds and len(seeds) > 1
        assert all(0 <= seed <= MAX_SEED for seed in seeds if seed is not None)

    def test_a_given_seed_is_kept(self) -> None:
        assert GenerationRequest(prompt="x", seed=42).normalized(seed=7).seed == 42

    def test_the_normalized_form_round_trips_for_the_worker(self) -> None:
        normalized = GenerationRequest(prompt="x", aspect_ratio="16:9", output_format="webp").normalized()
        payload = normalized.model_dump(mode="json")
        assert (payload["width"], payload["height"], payload["output_quality"]) == (1344, 768, 90)
        assert GenerationRequest.model_validate(payload, context=NORMALIZED_CONTEXT) == normalized

    def test_a_client_can_replay_the_normalized_request_as_is(self) -> None:
        normalized = GenerationRequest(prompt="x", aspect_ratio="16:9").normalized()
        payload = normalized.model_dump(mode="json", exclude_none=True)
        assert "aspect_ratio" not in payload  # resolved into width/height
        replay = GenerationRequest.model_validate(payload)
        assert (replay.width, replay.height, replay.seed) == (1344, 768, normalized.seed)

    def test_only_the_worker_may_read_strength_without_an_inline_init_image(self) -> None:
        payload = {"prompt": "x", "strength": 0.4, "width": 512, "height": 512, "seed": 1}
        with pytest.raises(ValidationError):
            GenerationRequest.model_validate(payload)
        assert GenerationRequest.model_validate(payload, context=NORMALIZED_CONTEXT).strength == 0.4

    def test_image_seeds_wrap_so_each_is_a_valid_request_seed(self) -> None:
        request = GenerationRequest(prompt="x", seed=MAX_SEED - 1, num_images=4)
        assert request.image_seeds() == [MAX_SEED - 1, MAX_SEED, 0, 1]


@given(
    width=st.integers(min_value=-100, max_value=3000),
    height=st.integers(min_value=-100, max_value=3000),
)
def test_explicit_sizes_are_accepted_exactly_when_the_model_can_generate_them(
    width: int, height: int
) -> None:
    valid = (
        width % 16 == 0
        and height % 16 == 0
        and 256 <= width <= 2048
        and 256 <= height <= 2048
        and 0.25 <= width * height / 1e6 <= 2.1
    )
    try:
        request = GenerationRequest(prompt="x", width=width, height=height)
    except ValidationError:
        assert not valid
    else:
        assert valid
        assert request.to_pipeline_kwargs()["width"] == width
