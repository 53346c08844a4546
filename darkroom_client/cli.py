"""``darkroom``: generate images on a darkroom server from the shell.

    darkroom generate "a red fox in the snow" --aspect-ratio 16:9 --seed 42 -o fox.png
    darkroom status gen_…      darkroom cancel gen_…

Progress goes to stderr and the result (a JSON summary, or the job) to stdout, so scripts can pipe it to
``jq``. Exit codes: 0 done; 1 the job failed or was canceled; 2 bad arguments or a request the server
refused (4xx); 3 the server or network failed (5xx, unreachable, bad download) or ``--timeout`` passed;
130 interrupted (Ctrl-C also asks the server to cancel the job, so no GPU time is spent on it).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from darkroom_client.client import DEFAULT_URL, DarkroomClient
from darkroom_client.errors import ChecksumMismatch, DarkroomError, WaitTimeout
from darkroom_client.progress import ProgressDisplay
from schemas.generation import OutputFormat
from schemas.jobs import CreateGeneration, Job, JobStatus
from schemas.sizes import AspectRatio

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

_EXTENSION_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
# Request field -> the flag that sets it, so a validation error names what the user typed.
_FLAGS = {
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
    "init_image": "--init-image",
    "strength": "--strength",
}


class UsageError(Exception):
    """Arguments that cannot make a valid request; reported before anything is sent."""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=os.environ.get("DARKROOM_URL", DEFAULT_URL),
        metavar="URL",
        help="API base URL (env DARKROOM_URL, default %(default)s)",
    )
    common.add_argument(
        "--api-key",
        default=os.environ.get("DARKROOM_API_KEY"),
        metavar="KEY",
        help="sent as 'Authorization: Bearer KEY' (env DARKROOM_API_KEY)",
    )
    parser = argparse.ArgumentParser(
        prog="darkroom",
        description="Generate images on a darkroom server.",
        epilog="exit codes: 0 done, 1 job failed or canceled, 2 bad arguments or refused (4xx), "
        "3 server/network failure or --timeout, 130 interrupted (the job is canceled)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", parents=[common], help="submit, follow, download")
    generate.add_argument("prompt")
    generate.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="image file; image i>0 is NAME-i.EXT (default: JOB_ID.EXT)",
    )
    generate.add_argument("--negative-prompt")
    generate.add_argument("--aspect-ratio", choices=[ratio.value for ratio in AspectRatio])
    generate.add_argument("--width", type=int, metavar="PX")
    generate.add_argument("--height", type=int, metavar="PX")
    generate.add_argument("--seed", type=int, metavar="N")
    generate.add_argument("--steps", type=int, dest="num_inference_steps", metavar="N")
    generate.add_argument("--guidance-scale", type=float, metavar="X")
    generate.add_argument("--num-images", type=int, metavar="N")
    generate.add_argument(
        "--format",
        choices=[fmt.value for fmt in OutputFormat],
        dest="output_format",
        help="default: from the -o extension, else png",
    )
    generate.add_argument(
        "--quality", type=int, dest="output_quality", metavar="Q", help="jpeg/webp quality 1..100"
    )
    generate.add_argument("--max-sequence-length", type=int, metavar="TOKENS")
    generate.add_argument(
        "--slg",
        action="store_true",
        dest="skip_layer_guidance",
        default=None,
        help="skip-layer guidance with SD3.5-Medium's documented settings",
    )
    generate.add_argument(
        "--init-image", type=Path, metavar="FILE", help="image file to start from (image-to-image)"
    )
    generate.add_argument(
        "--strength", type=float, metavar="S", help="how far to depart from --init-image (0..1]"
    )
    generate.add_argument(
        "--idempotency-key", metavar="KEY", help="resubmitting with the same key returns the same job"
    )
    generate.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="give up waiting after this many seconds (exit 3)"
    )
    generate.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    status = commands.add_parser("status", parents=[common], help="print a job as JSON")
    status.add_argument("job_id")
    cancel = commands.add_parser("cancel", parents=[common], help="cancel a job; prints it as JSON")
    cancel.add_argument("job_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "generate": run_generate,
        "status": run_status,
        "cancel": run_cancel,
    }
    try:
        return commands[args.command](args)
    except UsageError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except DarkroomError as exc:
        _say(f"the server refused: {exc}" if exc.status < 500 else f"server error: {exc}")
        return EXIT_USAGE if 400 <= exc.status < 500 else EXIT_UNAVAILABLE
    except httpx.TransportError as exc:
        _say(f"cannot talk to {args.server}: {exc or type(exc).__name__}")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `darkroom status ID | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second traceback at exit
        return EXIT_OK


def _say(message: str) -> None:
    print(f"darkroom: {message}", file=sys.stderr, flush=True)


def _client(args: argparse.Namespace, timeout: float = 30.0) -> DarkroomClient:
    return DarkroomClient(args.server, api_key=args.api_key, timeout=timeout)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False), flush=True)


# --- generate ----------------------------------------------------------------------------------------------


def request_from_args(args: argparse.Namespace) -> CreateGeneration:
    """The request the flags describe, validated here with the server's own rules (no round trip)."""
    fields: dict[str, Any] = {
        name: getattr(args, name)
        for name in _FLAGS
        if name != "init_image" and getattr(args, name) is not None
    }
    fields["prompt"] = args.prompt
    suffix = args.output.suffix.lower() if args.output else ""
    implied = _EXTENSION_FORMATS.get(suffix)
    if "output_format" not in fields and implied:
        fields["output_format"] = implied
    elif implied and implied != fields.get("output_format"):
        raise UsageError(f"-o {args.output} does not match --format {fields['output_format']}")
    if args.init_image is not None:
        try:
            fields["init_image"] = base64.b64encode(args.init_image.read_bytes()).decode("ascii")
        except OSError as exc:
            raise UsageError(f"--init-image: {exc.strerror or exc}: {args.init_image}") from None
    try:
        return CreateGeneration(**fields)
    except ValidationError as exc:
        raise UsageError("invalid request:\n" + _describe_validation(exc)) from None


def _describe_validation(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "request"
        flag = _FLAGS.get(str(error["loc"][0]) if error["loc"] else "", "")
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}{f' ({flag})' if flag else ''}: {message}")
    return "\n".join(lines)


def output_paths(output: Path | None, job: Job) -> list[Path]:
    """``NAME.EXT``, ``NAME-1.EXT``, …; the extension follows the format when ``-o`` has none."""
    extension = "." + job.request.output_format.extension
    base = output if output is not None else Path(job.id)
    if not base.suffix:
        base = base.with_name(base.name + extension)
    return [
        base if i == 0 else base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(len(job.images))
    ]


def summary(job: Job, paths: list[Path], elapsed_s: float) -> dict[str, Any]:
    """What a script needs from the run: ids, seeds, where the files are, and that their bytes checked out."""
    return {
        "id": job.id,
        "status": job.status.value,
        "seed": job.request.seed,
        "width": job.request.width,
        "height": job.request.height,
        "images": [
            {
                "path": str(path.resolve()),
                "seed": image.seed,
                "width": image.width,
                "height": image.height,
                "content_type": image.content_type,
                "bytes": path.stat().st_size,
                "sha256": image.sha256,
                "sha256_verified": True,  # download() refuses a file whose hash differs
            }
            if image.url is not None
            else {  # withheld by the content filter: never stored, nothing downloaded
                "path": None,
                "seed": image.seed,
                "finish_reason": image.finish_reason,
                "filter_reason": image.filter_reason,
            }
            for image, path in zip(job.images[: len(paths)], paths, strict=True)
        ],
        "warnings": job.warnings,
        "error": job.error.model_dump() if job.error else None,
        "elapsed_s": round(elapsed_s, 3),
    }


def run_generate(args: argparse.Namespace) -> int:
    request = request_from_args(args)
    started = time.monotonic()
    display = None if args.quiet else ProgressDisplay(sys.stderr)
    job: Job | None = None
    with _client(args) as client:
        try:
            job = client.generate(request, idempotency_key=args.idempotency_key)
            job = client.wait(job, timeout=args.timeout, on_progress=display)
        except KeyboardInterrupt:
            if display is not None:
                display.finish()
            if job is not None and not job.status.is_terminal:
                _cancel_after_interrupt(args, job.id)
            else:
                _say("interrupted")
            return EXIT_INTERRUPTED
        except WaitTimeout as exc:
            if display is not None:
                display.finish()
            _say(f"{exc}; it goes on: `darkroom status {exc.job.id}` or `darkroom cancel {exc.job.id}`")
            return EXIT_UNAVAILABLE
        if display is not None:
            display.finish()
        if job.status is not JobStatus.SUCCEEDED:
            reason = f": {job.error.type}: {job.error.message}" if job.error else ""
            _say(f"job {job.id} {job.status.value}{reason}")
            _print_json(summary(job, [], time.monotonic() - started))
            return EXIT_JOB_FAILED
        paths = output_paths(args.output, job)
        try:
            for image, path in zip(job.images, paths, strict=True):
                if image.url is not None:  # None: withheld by the content filter (a warning says so)
                    client.download(image, path)
        except ChecksumMismatch as exc:
            _say(f"download of {job.id} is corrupt: {exc}")
            return EXIT_UNAVAILABLE
    for warning in job.warnings:
        _say(f"warning: {warning}")
    _print_json(summary(job, paths, time.monotonic() - started))
    return EXIT_OK


def _cancel_after_interrupt(args: argparse.Namespace, job_id: str) -> None:
    """Ctrl-C means "I no longer want this": free the GPU rather than leave an orphan job running."""
    try:
        with _client(args, timeout=5.0) as client:
            job = client.cancel(job_id)
        state = "canceled" if job.status is JobStatus.CANCELED else "cancel requested"
        _say(f"interrupted; {state}: {job_id}")
    except DarkroomError as exc:
        _say(f"interrupted; could not cancel {job_id}: {exc.code}")
    except (httpx.HTTPError, KeyboardInterrupt):
        _say(f"interrupted; could not reach the server to cancel {job_id}")


# --- status, cancel ----------------------------------------------------------------------------------------


def run_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.get(args.job_id).model_dump(mode="json"))
    return EXIT_OK


def run_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id)
    if not job.status.is_terminal:
        _say(f"cancel requested: {job.id} stops at its next denoising step")
    _print_json(job.model_dump(mode="json"))
    return EXIT_OK
