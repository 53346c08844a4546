"""Image-size rules of SD3.5-Medium, stated once for the API edge and the engine.

The model works on latents 8x smaller than the image, cut into 2x2 patches, so every side must be a multiple
of ``vae_scale_factor * patch_size = 16``. Outside roughly 0.25..2 megapixels its output degrades badly, so
we refuse such sizes up front instead of spending GPU time on them.
"""

from __future__ import annotations

import math
from enum import StrEnum

from pydantic import GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

SIZE_MULTIPLE = 16  # vae_scale_factor (8) * transformer patch_size (2)
MIN_SIDE = 256
MAX_SIDE = 2048
MIN_MEGAPIXELS = 0.25
MAX_MEGAPIXELS = 2.1
_TARGET_PIXELS = 1024 * 1024


class AspectRatio(StrEnum):
    """Stability's aspect-ratio set; each maps to a ~1 megapixel size whose sides are multiples of 64."""

    SQUARE = "1:1"
    WIDE_16_9 = "16:9"
    ULTRAWIDE_21_9 = "21:9"
    PORTRAIT_2_3 = "2:3"
    LANDSCAPE_3_2 = "3:2"
    PORTRAIT_4_5 = "4:5"
    LANDSCAPE_5_4 = "5:4"
    TALL_9_16 = "9:16"
    TALL_9_21 = "9:21"

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # Values such as "16:9" are no identifiers: without these names generators call them VALUE_1...
        schema = handler.resolve_ref_schema(handler(core_schema))
        schema["x-enum-varnames"] = [ratio.name for ratio in cls]
        return schema


ASPECT_RATIO_SIZES: dict[AspectRatio, tuple[int, int]] = {
    AspectRatio.SQUARE: (1024, 1024),
    AspectRatio.WIDE_16_9: (1344, 768),
    AspectRatio.ULTRAWIDE_21_9: (1536, 640),
    AspectRatio.PORTRAIT_2_3: (832, 1216),
    AspectRatio.LANDSCAPE_3_2: (1216, 832),
    AspectRatio.PORTRAIT_4_5: (896, 1088),
    AspectRatio.LANDSCAPE_5_4: (1088, 896),
    AspectRatio.TALL_9_16: (768, 1344),
    AspectRatio.TALL_9_21: (640, 1536),
}
DEFAULT_ASPECT_RATIO = AspectRatio.SQUARE


def megapixels(width: int, height: int) -> float:
    """Decimal megapixels (10**6 pixels), the unit the limits above are written in."""
    return width * height / 1_000_000


def side_problem(name: str, side: int) -> str | None:
    """Why one side cannot be generated, or None when it can."""
    if side % SIZE_MULTIPLE:
        return (
            f"{name} {side} is not a multiple of {SIZE_MULTIPLE} (the model's vae_scale_factor x patch_size)"
        )
    if not MIN_SIDE <= side <= MAX_SIDE:
        return f"{name} {side} is outside {MIN_SIDE}..{MAX_SIDE}"
    return None


def size_problem(width: int, height: int) -> str | None:
    """Why ``width`` x ``height`` cannot be generated, or None when it can."""
    for name, side in (("width", width), ("height", height)):
        problem = side_problem(name, side)
        if problem:
            return problem
    mp = megapixels(width, height)
    if not MIN_MEGAPIXELS <= mp <= MAX_MEGAPIXELS:
        return f"{width}x{height} is {mp:.2f} megapixels, outside {MIN_MEGAPIXELS}..{MAX_MEGAPIXELS}"
    return None


def fit_size(width: int, height: int) -> tuple[int, int]:
    """A generable size with the aspect ratio of an arbitrary image (used for image-to-image defaults).

    Images already within the limits keep their size, rounded down to multiples of 16; others are scaled to
    about one megapixel. Raises ValueError when the aspect ratio itself is too extreme to fit.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is empty")
    candidate = (_round_down(width), _round_down(height))
    if size_problem(*candidate) is None:
        return candidate
    scale = math.sqrt(_TARGET_PIXELS / (width * height))
    candidate = (_round_down(round(width * scale)), _round_down(round(height * scale)))
    problem = size_problem(*candidate)
    if problem is not None:
        raise ValueError(
            f"a {width}x{height} image cannot be fitted to a supported size ({problem}); "
            "give width and height or aspect_ratio explicitly"
        )
    return candidate


def _round_down(side: int) -> int:
    return max(SIZE_MULTIPLE, side - side % SIZE_MULTIPLE)
