"""``python -m worker generate``: run the engine alone, without Redis, storage or the API.

Useful to check a model folder or a GPU before putting a worker in the fleet, and to reproduce a job's
image from its returned seed.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from schemas.generation import GenerationRequest, OutputFormat
from schemas.sizes import AspectRatio
from services.settings import Settings
from worker.errors import EngineError

_EXTENSION_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def add_generate_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("generate", help="generate images with the engine alone")
    parser.add_argument("prompt")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("out.png"), help="file (image i>0: NAME-i.EXT)"
    )
    parser.add_argument("--negative-prompt")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--aspect-ratio", choices=[ratio.value for ratio in AspectRatio])
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, dest="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--format", choices=[fmt.value for fmt in OutputFormat], dest="output_format")
    parser.add_argument("--quality", type=int, dest="output_quality")
    parser.add_argument("--max-sequence-length", type=int)
    parser.add_argument("--slg", action="store_true", dest="skip_layer_guidance", default=None)
    parser.add_argument("--init-image", type=Path, help="image file for image-to-image")
    parser.add_argument("--strength", type=float)
    parser.add_argument("--model", help="overrides DARKROOM_MODEL")
    parser.add_argument("--device", help="overrides DARKROOM_DEVICE")


def _request_from_args(args: argparse.Namespace) -> GenerationRequest:
    fields = {
        name: getattr(args, name)
        for name in (
            "prompt",
            "negative_prompt",
            "seed",
            "aspect_ratio",
            "width",
            "height",
            "num_inference_steps",
            "guidance_scale",
            "num_images",
            "output_format",
            "output_quality",
            "max_sequence_length",
            "skip_layer_guidance",
            "strength",
        )
        if getattr(args, name) is not None
    }
    if "output_format" not in fields and args.output.suffix.lower() in _EXTENSION_FORMATS:
        fields["output_format"] = _EXTENSION_FORMATS[args.output.suffix.lower()]
    if args.init_image is not None:
        fields["init_image"] = base64.b64encode(args.init_image.read_bytes()).decode("ascii")
    return GenerationRequest(**fields)


def output_paths(output: Path, count: int) -> list[Path]:
    return [output if i == 0 else output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def run_generate(args: argparse.Namespace) -> int:
    try:
        request = _request_from_args(args).normalized()
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "request"
            print(f"error: {field}: {error['msg']}", file=sys.stderr)
        return 2
    overrides = {key: value for key, value in (("model", args.model), ("device", args.device)) if value}
    settings = Settings(**overrides)

    from worker.engine import GenerationEngine  # heavy: torch + diffusers
    from worker.pipeline_loader import load_pipeline

    # On a terminal one line is rewritten in place; into a pipe or a log, one line per step (a "\r" there
    # would leave "step 1/8step 2/8..." on a single line).
    rewrite = sys.stderr.isatty()
    try:
        engine = GenerationEngine(load_pipeline(settings))

        def show_progress(step: int, total: int) -> None:
            if rewrite:
                print(f"\rstep {step}/{total}", end="", file=sys.stderr, flush=True)
            else:
                print(f"step {step}/{total}", file=sys.stderr, flush=True)

        result = engine.generate(request, on_progress=show_progress)
    except EngineError as exc:
        if rewrite:
            print(file=sys.stderr)  # end the progress line
        print(f"error: {exc.code}: {exc}", file=sys.stderr)
        return 1
    if rewrite:
        print(file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for path, image in zip(output_paths(args.output, len(result.images)), result.images, strict=True):
        path.write_bytes(image.data)
        written.append({"path": str(path), "seed": image.seed, "sha256": image.sha256})
    print(json.dumps({"request": request.model_dump(mode="json", exclude={"init_image"}), "images": written}))
    return 0
