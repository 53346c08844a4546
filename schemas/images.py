"""Decoding and vetting of user-supplied images (``init_image``) at the API edge.

An init image arrives as base64 (optionally a ``data:`` URL). We check everything that could hurt later —
bad base64, bytes that are not an image, a truncated file, a decompression bomb — before the request is
accepted, so the worker only ever sees images that decode.

In two steps, so that no pixel is decoded on the API's event loop: request validation *probes* an image
(:func:`probe_base64_image`: strict base64, then the header only — format, size, the pixel limit — which PIL
reads without decoding pixels), and the API decodes it fully (:func:`vet_base64_image`) in a worker thread,
after the key's rate-limit token was taken, before it is stored.

Images are seen upright: a camera JPEG stores a portrait photo as landscape pixels plus an EXIF
``Orientation`` tag, and every size check and every decode (:func:`open_upright`) applies that tag, as
viewers do. The stored file stays as sent.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_INIT_IMAGE_BYTES = 10 * 1024 * 1024
MAX_INIT_IMAGE_PIXELS = 4096 * 4096
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
_FORMAT_NAMES = "PNG, JPEG or WebP"
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_ORIENTATION = 0x0112  # EXIF Orientation; 5-8 turn the image a quarter (width and height swap)


@dataclass(frozen=True)
class VettedImage:
    """An init image that decoded fully; ``data`` is the original file, unchanged; ``width`` and
    ``height`` are its upright size (EXIF orientation applied)."""

    data: bytes
    format: str
    width: int
    height: int


def decode_base64_image(value: str) -> bytes:
    """Bytes of a base64 (or data-URL) image, refusing anything that is not strict base64."""
    payload = _DATA_URL.sub("", value.strip(), count=1)
    payload = "".join(payload.split())  # line-wrapped base64 is common (e.g. `base64` without -w0)
    if len(payload) > (MAX_INIT_IMAGE_BYTES * 4) // 3 + 4:
        raise ValueError(f"image is larger than {MAX_INIT_IMAGE_BYTES} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image is not valid base64") from None


def vet_image(data: bytes, *, decode: bool = True) -> VettedImage:
    """Check that ``data`` is a whole PNG/JPEG/WebP image of bounded size, reading the header first;
    ``decode=False``: the header only (cheap; a truncated or corrupt body is not found)."""
    if not data:
        raise ValueError("image is empty")
    if len(data) > MAX_INIT_IMAGE_BYTES:
        raise ValueError(f"image is {len(data)} bytes, more than {MAX_INIT_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or "?"
            width, height = image.size
            if fmt not in ACCEPTED_FORMATS:
                raise ValueError(f"image format {fmt} is not one of {sorted(ACCEPTED_FORMATS)}")
            if width * height > MAX_INIT_IMAGE_PIXELS:  # checked before decoding: decompression bombs
                raise ValueError(f"image is {width}x{height}, more than {MAX_INIT_IMAGE_PIXELS} pixels")
            if decode:
                image.load()  # a truncated or corrupt body fails here, not later on a GPU worker
            if image.getexif().get(_ORIENTATION) in (5, 6, 7, 8):  # header data: no pixels decoded
                width, height = height, width
    except UnidentifiedImageError:
        # PIL's message names the buffer it read ("<_io.BytesIO object at 0x7f…>"): no use to a client.
        message = f"not an image: the base64 decodes to bytes that are no {_FORMAT_NAMES} file"
        raise ValueError(message) from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"image could not be decoded: {_OBJECT_REPR.sub('the image', str(exc))}") from None
    return VettedImage(data=data, format=fmt, width=width, height=height)


def open_upright(data: bytes, mode: str = "RGB") -> Image.Image:
    """Decode a (vetted) image file to ``mode``, turned as its EXIF orientation says."""
    with Image.open(io.BytesIO(data)) as opened:
        return ImageOps.exif_transpose(opened).convert(mode)


def vet_base64_image(value: str) -> VettedImage:
    """The whole check, pixels decoded: tens to hundreds of milliseconds of CPU — off the event loop."""
    return vet_image(decode_base64_image(value))


def probe_base64_image(value: str) -> VettedImage:
    """Base64 and header checks only (format, size, pixel limit): linear in the bytes, no pixel decoded;
    what request validation may afford on the event loop."""
    return vet_image(decode_base64_image(value), decode=False)
