"""The outpainting canvas and mask the API draws (``schemas/outpaint.py``), and the request rules."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from pydantic import ValidationError

from schemas.generation import GenerationRequest
from schemas.outpaint import Outpaint, outpaint_canvas


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def striped() -> Image.Image:
    """100x60: red left column, blue right column, green elsewhere (so each edge is recognisable)."""
    image = Image.new("RGB", (100, 60), (0, 200, 0))
    image.paste((255, 0, 0), (0, 0, 1, 60))
    image.paste((0, 0, 255), (99, 0, 100, 60))
    return image


def test_the_canvas_repeats_each_edge_and_keeps_the_image_in_place() -> None:
    grow = Outpaint(left=20, right=10, top=5, bottom=0, feather=0)
    canvas_png, mask_png = outpaint_canvas(png(striped()), grow)
    canvas, mask = Image.open(io.BytesIO(canvas_png)), Image.open(io.BytesIO(mask_png))
    assert canvas.size == mask.size == (130, 65)
    assert canvas.crop((20, 5, 120, 65)).tobytes() == striped().tobytes()  # untouched, in place
    assert canvas.getpixel((0, 30)) == (255, 0, 0) and canvas.getpixel((129, 30)) == (0, 0, 255)
    assert canvas.getpixel((50, 0)) == (0, 200, 0) and canvas.getpixel((0, 0)) == (255, 0, 0)  # corner
    assert mask.getpixel((0, 30)) == 255 and mask.getpixel((125, 30)) == 255 and mask.getpixel((50, 2)) == 255
    assert mask.crop((20, 5, 120, 65)).getextrema() == (0, 0)  # no feather: the image is kept whole


def test_the_feather_fades_into_the_image_only_along_sides_that_grew() -> None:
    _, mask_png = outpaint_canvas(png(striped()), Outpaint(left=16, feather=8))
    mask = Image.open(io.BytesIO(mask_png))
    row = [mask.getpixel((x, 30)) for x in range(14, 28)]
    assert row[:2] == [255, 255]  # the new border
    assert all(a > b for a, b in zip(row[2:10], row[3:11], strict=False))  # fading over 8 pixels
    assert row[10:] == [0, 0, 0, 0]  # then the image, kept
    assert mask.getpixel((115, 30)) == 0 and mask.getpixel((60, 0)) == 0  # right and top did not grow


def request(**fields: object) -> GenerationRequest:
    init = base64.b64encode(png(Image.new("RGB", (512, 384), "navy"))).decode()
    return GenerationRequest.model_validate({"prompt": "a harbour", "init_image": init, **fields})


def test_a_request_becomes_inpainting_on_the_grown_canvas() -> None:
    grown = request(outpaint={"left": 128, "right": 128, "top": 64, "bottom": 64}).with_outpaint_canvas()
    assert grown.is_inpainting
    normalized = grown.normalized()
    assert (normalized.width, normalized.height, normalized.strength) == (768, 512, 1.0)
    plain = request().normalized()
    assert plain.strength == 0.6 and plain.with_outpaint_canvas() is plain


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"outpaint": {}}, "at least one of left, right, top, bottom"),
        ({"outpaint": {"left": 1025}}, "less than or equal to 1024"),
        ({"outpaint": {"left": -1}}, "greater than or equal to 0"),
        ({"outpaint": {"left": 8, "feather": 200}}, "less than or equal to 128"),
        ({"outpaint": {"left": 8, "up": 8}}, "Extra inputs are not permitted"),
        ({"outpaint": {"left": 8}, "init_image": None}, "give init_image too"),
        ({"outpaint": {"left": 8}, "mask_image": "x"}, "outpaint or mask_image"),
    ],
)
def test_bad_outpaint_options_are_refused(fields: dict[str, object], message: str) -> None:
    if fields.get("mask_image") == "x":
        fields = {**fields, "mask_image": base64.b64encode(png(Image.new("L", (512, 384), 0))).decode()}
    with pytest.raises(ValidationError, match=message):
        request(**fields)
