"""Output files: parameters embedded (A1111 text + full JSON), quality honoured, hashes of the bytes."""

from __future__ import annotations

import base64
import hashlib
import io

from PIL import Image

from schemas.generation import GenerationRequest, OutputFormat
from worker.encoding import (
    EXIF_TEXT_LIMIT_BYTES,
    TRUNCATED_MARKER,
    a1111_parameters,
    encode_image,
    read_exif_parameters,
    read_png_metadata,
)


def sample_image() -> Image.Image:
    image = Image.effect_noise((512, 512), 64).convert("RGB")
    return image


def request(**fields: object) -> GenerationRequest:
    base: dict[str, object] = {"prompt": "a red fox, in the snow", "seed": 7, "width": 512, "height": 512}
    return GenerationRequest(**{**base, **fields}).normalized()


def test_png_metadata_round_trips_through_pillow() -> None:
    req = request(negative_prompt="blurry", skip_layer_guidance=True, num_inference_steps=30)
    encoded = encode_image(
        sample_image(), req, seed=8, index=1, model="stabilityai/stable-diffusion-3.5-medium"
    )
    parameters, meta = read_png_metadata(encoded.data)
    assert meta["request"] == req.model_dump(mode="json", exclude={"init_image", "mask_image"})
    assert (meta["seed"], meta["image_index"]) == (8, 1)
    assert meta["model"] == "stabilityai/stable-diffusion-3.5-medium"
    lines = parameters.split("\n")
    assert lines[0] == "a red fox, in the snow"
    assert lines[1] == "Negative prompt: blurry"
    assert "Steps: 30" in lines[2] and "Seed: 8" in lines[2] and "Size: 512x512" in lines[2]
    assert "CFG scale: 4.5" in lines[2] and 'SLG layers: "7,8,9"' in lines[2]


def test_unicode_prompts_survive_the_png_text_chunks() -> None:
    req = request(prompt="狐狸 in the snow 🦊")
    parameters, meta = read_png_metadata(encode_image(sample_image(), req, 7, 0, "tiny").data)
    assert parameters.startswith("狐狸 in the snow 🦊")
    assert meta["request"]["prompt"] == "狐狸 in the snow 🦊"


def test_same_pixels_encode_to_the_same_bytes_and_hash() -> None:
    image = sample_image()
    first = encode_image(image, request(), 7, 0, "tiny")
    second = encode_image(image.copy(), request(), 7, 0, "tiny")
    assert first.data == second.data
    assert first.sha256 == hashlib.sha256(first.data).hexdigest() == second.sha256


def test_jpeg_and_webp_honour_quality_and_carry_the_parameters() -> None:
    image = sample_image()
    for fmt in (OutputFormat.JPEG, OutputFormat.WEBP):
        low = encode_image(image, request(output_format=fmt, output_quality=20), 7, 0, "tiny")
        high = encode_image(image, request(output_format=fmt, output_quality=95), 7, 0, "tiny")
        assert len(low.data) < len(high.data)
        assert low.content_type == f"image/{fmt.value}"
        with Image.open(io.BytesIO(high.data)) as decoded:
            assert decoded.format == ("JPEG" if fmt is OutputFormat.JPEG else "WEBP")
            comment = decoded.getexif().get_ifd(0x8769)[0x9286]
        text = comment[8:].decode("utf-16-be") if isinstance(comment, bytes) else str(comment)
        assert "Seed: 7" in text


def test_image_to_image_metadata_names_the_init_image_by_hash_not_by_content() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (512, 512), "red").save(buffer, format="PNG")
    init = base64.b64encode(buffer.getvalue()).decode()
    req = request(init_image=init, strength=0.4)
    parameters, meta = read_png_metadata(encode_image(sample_image(), req, 7, 0, "tiny").data)
    assert "init_image" not in meta["request"]
    assert meta["request"]["init_image_sha256"] == hashlib.sha256(base64.b64decode(init)).hexdigest()
    assert parameters == a1111_parameters(req, 7, "tiny")
    assert "Denoising strength: 0.4" in parameters


def test_line_breaks_in_prompts_cannot_forge_parameter_lines() -> None:
    forged = "a cat\nSteps: 99, Sampler: x, Model: forged\r\nNegative prompt: evil\u2028Seed: 1"
    req = request(prompt=forged, negative_prompt="blurry\rSteps: 1", guidance_scale=4.0)
    for fmt in (OutputFormat.PNG, OutputFormat.JPEG):
        encoded = encode_image(sample_image(), req.model_copy(update={"output_format": fmt}), 7, 0, "tiny")
        if fmt is OutputFormat.PNG:
            parameters, meta = read_png_metadata(encoded.data)
            assert meta["request"]["prompt"] == forged  # the JSON keeps the prompt exactly
        else:
            parameters = read_exif_parameters(encoded.data)
        lines = parameters.split("\n")
        assert lines == [
            "a cat Steps: 99, Sampler: x, Model: forged Negative prompt: evil Seed: 1",
            "Negative prompt: blurry Steps: 1",
            lines[2],
        ]
        assert lines[2].startswith("Steps: 40, Sampler: Euler, ") and "Model: tiny" in lines[2]


def test_exif_parameters_are_shortened_to_fit_with_a_marker() -> None:
    """10,000 emoji in each prompt (the schema's limit) are 80,284 bytes of UTF-16 text: more than a JPEG's
    EXIF segment holds (65,533). The image is still produced; the prompts are cut to fit."""
    emoji = "\U0001f600" * 10_000
    req = request(prompt=emoji, negative_prompt=emoji, guidance_scale=4.0)
    assert len(a1111_parameters(req, 7, "tiny").encode("utf-16-be")) == 80_284
    for fmt in (OutputFormat.JPEG, OutputFormat.WEBP):
        encoded = encode_image(sample_image(), req.model_copy(update={"output_format": fmt}), 7, 0, "tiny")
        parameters = read_exif_parameters(encoded.data)
        assert len(parameters.encode("utf-16-be")) <= EXIF_TEXT_LIMIT_BYTES
        prompt, negative, settings = parameters.split("\n")
        assert prompt.endswith(TRUNCATED_MARKER) and negative.endswith(TRUNCATED_MARKER)
        assert prompt.startswith("\U0001f600" * 7_000) and negative.startswith("Negative prompt: \U0001f600")
        assert settings == a1111_parameters(req, 7, "tiny").split("\n")[-1]
    # A short prompt is kept whole; the long negative prompt takes the room left.
    short = request(prompt="a fox", negative_prompt=emoji, guidance_scale=4.0)
    text = a1111_parameters(short, 7, "tiny", limit_bytes=30_000)
    assert text.startswith("a fox\nNegative prompt: \U0001f600") and TRUNCATED_MARKER in text
    assert 30_000 - 4 < len(text.encode("utf-16-be")) <= 30_000
    # Text that fits is left alone.
    assert a1111_parameters(req.model_copy(update={"prompt": "x"}), 7, "tiny", limit_bytes=10**6) == (
        a1111_parameters(req.model_copy(update={"prompt": "x"}), 7, "tiny")
    )
