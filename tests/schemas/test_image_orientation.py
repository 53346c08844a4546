"""Init images and masks are seen upright: the EXIF Orientation a camera writes is applied (issue #16, 16).

A phone stores a portrait photo as landscape pixels plus ``Orientation`` 6 ("turn 90° clockwise to
view"). Viewers show it upright; so must the size checks, the default output size and the pipeline.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from schemas.generation import GenerationRequest
from schemas.images import vet_image
from worker.engine import decode_init_image

_ORIENTATION = 0x0112


def portrait_jpeg() -> bytes:
    """768x512 stored pixels (left half red, right half blue) tagged Orientation 6: a 512x768 portrait
    whose top half is red once turned."""
    stored = Image.new("RGB", (768, 512), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 384, 512))
    exif = Image.Exif()
    exif[_ORIENTATION] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_a_portrait_jpeg_is_vetted_sized_and_decoded_upright() -> None:
    data = portrait_jpeg()
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.size == (768, 512) and stored.getexif()[_ORIENTATION] == 6

    vetted = vet_image(data)
    assert (vetted.width, vetted.height) == (512, 768)
    assert vetted.data == data  # the file itself is kept as sent

    request = GenerationRequest(prompt="a portrait", init_image=b64(data))
    assert request.resolved_size() == (512, 768)  # the default output size follows the upright image

    image = decode_init_image(b64(data))
    assert image.size == (512, 768)
    pixel = image.getpixel((256, 100))  # the top of the upright image is the red half
    assert isinstance(pixel, tuple) and pixel[0] > 200 and pixel[2] < 60, pixel


def test_a_mask_must_match_the_upright_size() -> None:
    mask = Image.new("L", (512, 768), 255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    request = GenerationRequest(
        prompt="repaint", init_image=b64(portrait_jpeg()), mask_image=b64(buffer.getvalue())
    )
    assert request.resolved_size() == (512, 768)
    assert decode_init_image(request.mask_image or "", "L").size == (512, 768)
