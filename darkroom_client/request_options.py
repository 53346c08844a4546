"""The generation flags ``generate`` and ``batch create`` share, turned into request fields.

One table maps each request field to the flag that sets it, so an error found locally — with the server's
own rules, before anything is sent — names what the user typed rather than a JSON field.
"""

from __future__ import annotations

import argparse
import base64
import math
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from darkroom_client.cli_support import UsageError
from schemas.generation import LORA_NAME_PATTERN, OutputFormat
from schemas.sizes import AspectRatio

# Request field -> the flag that sets it. The fields read from flags as they are come first; loras, outpaint
# and the images are parsed or read from files below.
FLAGS = {
    "model": "--model",
    "negative_prompt": "--negative-prompt",
    "aspect_ratio": "--aspect-ratio",
    "width": "--width",
    "height": "--height",
    "seed": "--seed",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "num_images": "--num-images",
    "output_format": "--format",
    "output_quality": "--quality",
    "max_sequence_length": "--max-sequence-length",
    "skip_layer_guidance": "--slg",
    "strength": "--strength",
    "loras": "--lora",
    "init_image": "--init-image",
    "mask_image": "--mask",
    "outpaint": "--outpaint",
}
_PARSED_FIELDS = ("loras", "init_image", "mask_image", "outpaint")
_PLAIN_FIELDS = tuple(name for name in FLAGS if name not in _PARSED_FIELDS)
LORA_FORMAT = "NAME[:SCALE], e.g. ink or ink:0.8"
OUTPAINT_SIDES = ("left", "right", "top", "bottom", "feather")
OUTPAINT_FORMAT = (
    "SIDE=PX pairs, e.g. right=256 or left=128,right=128,feather=24; or LEFT,RIGHT,TOP,BOTTOM[,FEATHER]"
)


def add_request_options(parser: argparse.ArgumentParser, *, image_inputs: bool) -> None:
    """Every generation flag but the prompt; ``image_inputs`` adds --init-image, --mask, --outpaint and
    --strength (batch items are text-to-image only, so ``batch create`` goes without)."""
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="a model the server serves (`darkroom models` lists them); default: the server's default",
    )
    parser.add_argument("--negative-prompt")
    parser.add_argument("--aspect-ratio", choices=[ratio.value for ratio in AspectRatio])
    parser.add_argument("--width", type=int, metavar="PX")
    parser.add_argument("--height", type=int, metavar="PX")
    parser.add_argument("--seed", type=int, metavar="N")
    parser.add_argument("--steps", type=int, dest="num_inference_steps", metavar="N")
    parser.add_argument("--guidance-scale", type=float, metavar="X")
    parser.add_argument("--num-images", type=int, metavar="N")
    parser.add_argument(
        "--format",
        choices=[fmt.value for fmt in OutputFormat],
        dest="output_format",
        help="default: from the -o extension, else png" if image_inputs else "default png",
    )
    parser.add_argument(
        "--quality", type=int, dest="output_quality", metavar="Q", help="jpeg/webp quality 1..100"
    )
    parser.add_argument("--max-sequence-length", type=int, metavar="TOKENS")
    parser.add_argument(
        "--slg",
        action="store_true",
        dest="skip_layer_guidance",
        default=None,
        help="skip-layer guidance with SD3.5-Medium's documented settings",
    )
    parser.add_argument(
        "--lora",
        action="append",
        dest="loras",
        metavar="NAME[:SCALE]",
        help="apply a LoRA adapter the server offers, at SCALE (default 1; -2..2); repeatable",
    )
    if image_inputs:
        parser.add_argument(
            "--init-image", type=Path, metavar="FILE", help="image file to start from (image-to-image)"
        )
        parser.add_argument(
            "--mask",
            type=Path,
            dest="mask_image",
            metavar="FILE",
            help="inpainting: mask of --init-image's size, white repaints, black keeps",
        )
        parser.add_argument(
            "--outpaint",
            metavar="SIDE=PX,...",
            help="outpainting: grow --init-image's canvas and paint the new border, e.g. right=256 or "
            "left=128,right=128,feather=24 (sides 0..1024 px, feather 0..128, default 16); also "
            "LEFT,RIGHT,TOP,BOTTOM[,FEATHER]",
        )
        parser.add_argument(
            "--strength", type=float, metavar="S", help="how far to depart from --init-image (0..1]"
        )


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the flags set (the prompt excepted), files read and ``--lora`` parsed."""
    fields: dict[str, Any] = {
        name: getattr(args, name) for name in _PLAIN_FIELDS if getattr(args, name, None) is not None
    }
    if args.loras:
        fields["loras"] = [parse_lora(text) for text in args.loras]
    init_image: Path | None = getattr(args, "init_image", None)
    mask_image: Path | None = getattr(args, "mask_image", None)
    outpaint: str | None = getattr(args, "outpaint", None)
    if outpaint is not None:
        if mask_image is not None:
            raise UsageError("--outpaint cannot be combined with --mask: outpainting draws its own mask")
        if init_image is None:
            raise UsageError("--outpaint needs --init-image: it grows that image's canvas")
        fields["outpaint"] = parse_outpaint(outpaint)
    if mask_image is not None and init_image is None:
        raise UsageError("--mask needs --init-image: the mask marks which part of that image to repaint")
    if init_image is not None:
        fields["init_image"] = read_image(init_image, "--init-image")
    if mask_image is not None:
        fields["mask_image"] = read_image(mask_image, "--mask")
    return fields


def given_flags(args: argparse.Namespace) -> list[str]:
    """The generation flags given on this command line, as typed (for "cannot be combined" errors)."""
    return [flag for name, flag in FLAGS.items() if getattr(args, name, None) is not None]


def parse_lora(text: str) -> dict[str, Any]:
    """``ink`` or ``ink:0.8`` → ``{"name": "ink"}`` / ``{"name": "ink", "scale": 0.8}``.

    The shape is checked here, with messages about the flag; whether the scale is in range is the request
    model's business and whether the name is on offer the server's, as for every other field.
    """
    name, colon, scale = text.partition(":")
    if not name:
        raise UsageError(f"--lora {text!r}: the adapter name is missing ({LORA_FORMAT})")
    if re.fullmatch(LORA_NAME_PATTERN, name) is None:
        raise UsageError(
            f"--lora {text!r}: {name!r} is not an adapter name (letters, digits, '_', '.', '-'; "
            f"up to 64, first a letter or digit) ({LORA_FORMAT})"
        )
    if not colon:
        return {"name": name}
    try:
        value = float(scale)
    except ValueError:
        raise UsageError(f"--lora {text!r}: SCALE {scale!r} is not a number ({LORA_FORMAT})") from None
    if not math.isfinite(value):
        raise UsageError(f"--lora {text!r}: SCALE must be a finite number ({LORA_FORMAT})")
    return {"name": name, "scale": value}


def parse_outpaint(text: str) -> dict[str, int]:
    """``right=256`` / ``left=128,right=128,feather=24`` (named: any sides, any order), or
    ``128,128,0,0[,24]`` (all four sides in the API's order, left right top bottom) → the ``outpaint``
    object, with only what was given (the server's feather default stays the server's).

    Named sides are the form to prefer: most outpainting grows one or two sides, and a bare list of four
    numbers is easy to misorder (CSS lists top right bottom left). Ranges are the request model's business.
    """
    parts = [part.strip() for part in text.split(",")]
    named = ["=" in part for part in parts]
    if all(named):
        fields: dict[str, int] = {}
        for part in parts:
            name, _, value = part.partition("=")
            side = name.strip().lower()
            if side not in OUTPAINT_SIDES:
                raise UsageError(
                    f"--outpaint {text!r}: {name.strip()!r} is not one of {', '.join(OUTPAINT_SIDES)} "
                    f"({OUTPAINT_FORMAT})"
                )
            if side in fields:
                raise UsageError(f"--outpaint {text!r}: {side} is given twice")
            fields[side] = _pixels(text, side, value.strip())
        return fields
    if any(named):
        raise UsageError(f"--outpaint {text!r}: name every side or none ({OUTPAINT_FORMAT})")
    if len(parts) not in (4, 5):
        raise UsageError(
            f"--outpaint {text!r}: {len(parts)} value{'s' if len(parts) != 1 else ''}, but the list form "
            f"takes LEFT,RIGHT,TOP,BOTTOM and optionally FEATHER ({OUTPAINT_FORMAT})"
        )
    return {side: _pixels(text, side, value) for side, value in zip(OUTPAINT_SIDES, parts, strict=False)}


def _pixels(text: str, side: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(
            f"--outpaint {text!r}: {side} {value!r} is not a whole number of pixels ({OUTPAINT_FORMAT})"
        ) from None


def read_image(path: Path, flag: str) -> str:
    """The file's bytes as base64, as the API takes images inline; the server vets the format."""
    try:
        return base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        raise UsageError(f"{flag}: {exc.strerror or exc}: {path}") from None


def describe_validation(exc: ValidationError, extra_flags: dict[str, str] | None = None) -> str:
    """One line per error: the field's dotted path and, where a flag set it, that flag.

    A batch template's fields (``template.width``) are named by the same flags as a single request's;
    items read from a file (``requests.3.width``) have no flag to name.
    """
    flags = {**FLAGS, **(extra_flags or {})}
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        field = ".".join(loc) or "request"
        key = loc[1] if loc[:1] == ["template"] and len(loc) > 1 else (loc[0] if loc else "")
        flag = flags.get(key, "")
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}{f' ({flag})' if flag else ''}: {message}")
    return "\n".join(lines)
