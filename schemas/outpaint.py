"""Outpainting as a request option: grow the canvas around an init image and paint only the new border.

It is inpainting with a mask the server draws, so a client need not pad images and paint masks itself:
the init image is placed on a larger canvas whose new border repeats the image's edge pixels (a neutral
start that keeps the colours of each side), and the mask is white over the new border, black over the
image, with a ``feather`` band of the image along each grown side fading from white to black so the
seam is repainted too. Pure PIL, no torch: the API does it before the job is queued, so the worker runs
an ordinary inpainting job and the job stores the canvas and mask it ran with.
"""

from __future__ import annotations

import io
from typing import Self

from PIL import Image, ImageChops, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.images import open_upright

MAX_OUTPAINT = 1024  # pixels per side
MAX_FEATHER = 128


class Outpaint(BaseModel):
    """How many pixels to add on each side of ``init_image``, and how far into it to blend."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    left: int = Field(0, ge=0, le=MAX_OUTPAINT, description="Pixels added on the left.")
    right: int = Field(0, ge=0, le=MAX_OUTPAINT, description="Pixels added on the right.")
    top: int = Field(0, ge=0, le=MAX_OUTPAINT, description="Pixels added at the top.")
    bottom: int = Field(0, ge=0, le=MAX_OUTPAINT, description="Pixels added at the bottom.")
    feather: int = Field(
        16,
        ge=0,
        le=MAX_FEATHER,
        description="Pixels of the image, along each grown side, repainted in a fade so the seam blends.",
    )

    @model_validator(mode="after")
    def _grows_somewhere(self) -> Self:
        if not (self.left or self.right or self.top or self.bottom):
            raise ValueError("outpaint needs at least one of left, right, top, bottom above 0")
        return self

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        return width + self.left + self.right, height + self.top + self.bottom


def _repeat_edges(image: Image.Image, grow: Outpaint) -> Image.Image:
    """``image`` on the grown canvas, each new strip filled by stretching the image's outermost row or
    column (rows first, then columns across the full new height, so corners repeat the corner pixel)."""
    width, height = image.size
    wide = Image.new("RGB", (width + grow.left + grow.right, height))
    wide.paste(image, (grow.left, 0))
    if grow.left:
        wide.paste(image.crop((0, 0, 1, height)).resize((grow.left, height)), (0, 0))
    if grow.right:
        wide.paste(
            image.crop((width - 1, 0, width, height)).resize((grow.right, height)), (grow.left + width, 0)
        )
    full_width = wide.width
    canvas = Image.new("RGB", grow.canvas_size(width, height))
    canvas.paste(wide, (0, grow.top))
    if grow.top:
        canvas.paste(wide.crop((0, 0, full_width, 1)).resize((full_width, grow.top)), (0, 0))
    if grow.bottom:
        edge = wide.crop((0, height - 1, full_width, height)).resize((full_width, grow.bottom))
        canvas.paste(edge, (0, grow.top + height))
    return canvas


def _mask(width: int, height: int, grow: Outpaint) -> Image.Image:
    """White over the new border, black over the image, fading to black over ``feather`` pixels of the
    image along each side that grew (a side that did not grow stays sharp: nothing there to blend)."""
    band = min(grow.feather, width // 2, height // 2)
    inner = Image.new("L", (width, height), 0)
    for grown, line in (
        (grow.left, lambda i: (i, 0, i, height - 1)),
        (grow.right, lambda i: (width - 1 - i, 0, width - 1 - i, height - 1)),
        (grow.top, lambda i: (0, i, width - 1, i)),
        (grow.bottom, lambda i: (0, height - 1 - i, width - 1, height - 1 - i)),
    ):
        if not grown or not band:
            continue
        side = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(side)
        for i in range(band):
            draw.line(line(i), fill=round(255 * (band - i) / (band + 1)))
        inner = ImageChops.lighter(inner, side)  # where two sides meet, the stronger fade wins
    mask = Image.new("L", grow.canvas_size(width, height), 255)
    mask.paste(inner, (grow.left, grow.top))
    return mask


def outpaint_canvas(init_image: bytes, grow: Outpaint) -> tuple[bytes, bytes]:
    """The grown canvas and its mask, as PNG files, for an (already vetted) init image."""
    image = open_upright(init_image)
    canvas, mask = _repeat_edges(image, grow), _mask(image.width, image.height, grow)
    return _png(canvas), _png(mask)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
