"""``darkroom``: generate images on a darkroom server from the shell.

    darkroom generate "a red fox in the snow" --aspect-ratio 16:9 --seed 42 -o fox.png
    darkroom status gen_…      darkroom cancel gen_…
    darkroom batch create --prompt "a red fox" --seeds 1-8 --wait -o foxes/
    darkroom models            darkroom batch list

Progress goes to stderr and the result (a JSON summary, or the job) to stdout, so scripts can pipe it to
``jq``. Exit codes: 0 done; 1 the job (or an item of the batch) failed or was canceled; 2 bad arguments or a
request the server refused (4xx); 3 the server or network failed (5xx, unreachable, bad download) or
``--timeout`` passed; 130 interrupted (Ctrl-C also asks the server to cancel the job, so no GPU time is
spent on it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from darkroom_client.cli_batch import add_batch_commands
from darkroom_client.cli_support import (
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    UsageError,
    cancel_after_interrupt,
    connection_options,
    image_entry,
    open_client,
    print_json,
    say,
)
from darkroom_client.errors import ChecksumMismatch, DarkroomError, WaitTimeout
from darkroom_client.progress import ProgressDisplay
from darkroom_client.request_options import add_request_options, describe_validation, request_fields
from schemas.jobs import CreateGeneration, Job, JobStatus
from schemas.models import ServedModel

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "main",
]

_EXTENSION_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def build_parser() -> argparse.ArgumentParser:
    common = connection_options()
    parser = argparse.ArgumentParser(
        prog="darkroom",
        description="Generate images on a darkroom server.",
        epilog="exit codes: 0 done, 1 job (or a batch item) failed or canceled, 2 bad arguments or refused "
        "(4xx), 3 server/network failure or --timeout, 130 interrupted (the job is canceled)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", parents=[common], help="submit, follow, download")
    generate.set_defaults(run=run_generate)
    generate.add_argument("prompt")
    generate.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="image file; image i>0 is NAME-i.EXT (default: JOB_ID.EXT)",
    )
    add_request_options(generate, image_inputs=True)
    generate.add_argument(
        "--idempotency-key", metavar="KEY", help="resubmitting with the same key returns the same job"
    )
    generate.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="give up waiting after this many seconds (exit 3)"
    )
    generate.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    status = commands.add_parser("status", parents=[common], help="print a job as JSON")
    status.set_defaults(run=run_status)
    status.add_argument("job_id")
    cancel = commands.add_parser("cancel", parents=[common], help="cancel a job; prints it as JSON")
    cancel.set_defaults(run=run_cancel)
    cancel.add_argument("job_id")
    models = commands.add_parser(
        "models", parents=[common], help="the models requests may name, with their ready workers"
    )
    models.set_defaults(run=run_models)
    models.add_argument("--json", action="store_true", help="print the list as JSON")
    add_batch_commands(commands, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except UsageError as exc:
        say(str(exc))
        return EXIT_USAGE
    except DarkroomError as exc:
        say(f"the server refused: {exc}" if exc.status < 500 else f"server error: {exc}")
        return EXIT_USAGE if 400 <= exc.status < 500 else EXIT_UNAVAILABLE
    except httpx.TransportError as exc:
        say(f"cannot talk to {args.server}: {exc or type(exc).__name__}")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `darkroom status ID | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second traceback at exit
        return EXIT_OK


# --- generate ----------------------------------------------------------------------------------------------


def request_from_args(args: argparse.Namespace) -> CreateGeneration:
    """The request the flags describe, validated here with the server's own rules (no round trip)."""
    fields = request_fields(args)
    fields["prompt"] = args.prompt
    suffix = args.output.suffix.lower() if args.output else ""
    implied = _EXTENSION_FORMATS.get(suffix)
    if "output_format" not in fields and implied:
        fields["output_format"] = implied
    elif implied and implied != fields.get("output_format"):
        raise UsageError(f"-o {args.output} does not match --format {fields['output_format']}")
    try:
        return CreateGeneration(**fields)
    except ValidationError as exc:
        raise UsageError("invalid request:\n" + describe_validation(exc)) from None


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
            image_entry(image, path) for image, path in zip(job.images[: len(paths)], paths, strict=True)
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
    with open_client(args) as client:
        try:
            job = client.generate(request, idempotency_key=args.idempotency_key)
            job = client.wait(job, timeout=args.timeout, on_progress=display)
        except KeyboardInterrupt:
            if display is not None:
                display.finish()
            if job is not None and not job.status.is_terminal:
                cancel_after_interrupt(
                    args, job.id, lambda client: client.cancel(job.id).status is JobStatus.CANCELED
                )
            else:
                say("interrupted")
            return EXIT_INTERRUPTED
        except WaitTimeout as exc:
            if display is not None:
                display.finish()
            say(f"{exc}; it goes on: `darkroom status {exc.job.id}` or `darkroom cancel {exc.job.id}`")
            return EXIT_UNAVAILABLE
        if display is not None:
            display.finish()
        if job.status is not JobStatus.SUCCEEDED:
            reason = f": {job.error.type}: {job.error.message}" if job.error else ""
            say(f"job {job.id} {job.status.value}{reason}")
            print_json(summary(job, [], time.monotonic() - started))
            return EXIT_JOB_FAILED
        paths = output_paths(args.output, job)
        try:
            for image, path in zip(job.images, paths, strict=True):
                if image.url is not None:  # None: withheld by the content filter (a warning says so)
                    client.download(image, path)
        except ChecksumMismatch as exc:
            say(f"download of {job.id} is corrupt: {exc}")
            return EXIT_UNAVAILABLE
    for warning in job.warnings:
        say(f"warning: {warning}")
    print_json(summary(job, paths, time.monotonic() - started))
    return EXIT_OK


# --- status, cancel ----------------------------------------------------------------------------------------


def run_status(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        print_json(client.get(args.job_id).model_dump(mode="json"))
    return EXIT_OK


def run_cancel(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        job = client.cancel(args.job_id)
    if not job.status.is_terminal:
        say(f"cancel requested: {job.id} stops at its next denoising step")
    print_json(job.model_dump(mode="json"))
    return EXIT_OK


# --- models ------------------------------------------------------------------------------------------------


def model_line(model: ServedModel, id_width: int) -> str:
    """``tiny    default  1 ready, 0 queued, 0 batch queued``: one model, columns aligned over the list."""
    marker = "default" if model.default else ""
    return (
        f"{model.id:<{id_width}}  {marker:<7}  {model.ready_workers} ready, {model.queued} queued, "
        f"{model.batch_queued} batch queued"
    )


def run_models(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        models = client.list_models()
    if args.json:
        print_json([model.model_dump(mode="json") for model in models])
        return EXIT_OK
    id_width = max((len(model.id) for model in models), default=0)
    for model in models:
        print(model_line(model, id_width), flush=True)
    return EXIT_OK
