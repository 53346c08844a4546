"""``darkroom batch``: many images as one batch — submit, read, wait and download, cancel.

    darkroom batch create --prompt "a red fox" --seeds 1-8 --steps 20 --wait -o foxes/
    darkroom batch create --file prompts.jsonl            # prints the batch; follow it later:
    darkroom batch wait batch_… -o foxes/                 # waits, then downloads every image
    darkroom batch get batch_…      darkroom batch cancel batch_…
    darkroom batch list                                   # your batches, newest first

The items are one request repeated over ``--seeds`` or ``--count`` (the generation flags of ``generate``),
or read from ``--file``. Downloads are named by the item's place in the batch, so a folder lists in
submission order: ``0000.png``, ``0001.png``, … (image i > 0 of an item: ``0003-1.png``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from darkroom_client.cli_support import (
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    UsageError,
    cancel_after_interrupt,
    image_entry,
    open_client,
    print_json,
    say,
)
from darkroom_client.client import DEFAULT_BATCH_LIST_PAGE, MAX_BATCH_LIST_PAGE, DarkroomClient
from darkroom_client.errors import BatchWaitTimeout, ChecksumMismatch
from darkroom_client.progress import BatchProgressDisplay
from darkroom_client.request_options import (
    add_request_options,
    describe_validation,
    given_flags,
    request_fields,
)
from schemas.batches import MAX_BATCH_ITEMS, Batch, BatchItem, BatchStatus, CreateBatch
from schemas.generation import OutputFormat

_BATCH_FLAGS = {"seeds": "--seeds", "count": "--count"}
_JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
_SEED_SPAN = re.compile(r"(\d+)(?:-(\d+))?")


def add_batch_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    batch = commands.add_parser("batch", help="many images as one batch: create, get, wait, cancel, list")
    actions = batch.add_subparsers(dest="batch_command", required=True)

    create = actions.add_parser(
        "create",
        parents=[common],
        help="submit a batch; prints it (or, with --wait, downloads every image)",
        description="Items: --prompt with --seeds or --count (and any generation flag), or --file.",
    )
    create.set_defaults(run=run_batch_create)
    create.add_argument("--prompt", help="the prompt of every item (with --seeds or --count)")
    items = create.add_mutually_exclusive_group()
    items.add_argument("--seeds", metavar="LIST", help="one item per seed: 1-8, 1,5,9 or 1-4,10")
    items.add_argument(
        "--count", type=int, metavar="N", help="N items (seeds: --seed + i x images, or drawn)"
    )
    create.add_argument(
        "--file",
        metavar="PATH",
        help="the requests instead: a JSON array, a whole POST /v1/batches body, or JSON Lines "
        "(.jsonl/.ndjson, one request a line); - reads JSON from stdin",
    )
    add_request_options(create, image_inputs=False)
    create.add_argument(
        "--idempotency-key", metavar="KEY", help="resubmitting with the same key returns the same batch"
    )
    create.add_argument("--wait", action="store_true", help="wait for every item, then download the images")
    _add_wait_options(create)

    get = actions.add_parser("get", parents=[common], help="print a batch as JSON, every item included")
    get.set_defaults(run=run_batch_get)
    get.add_argument("batch_id")

    wait = actions.add_parser("wait", parents=[common], help="wait for a batch, then download its images")
    wait.set_defaults(run=run_batch_wait)
    wait.add_argument("batch_id")
    _add_wait_options(wait)

    cancel = actions.add_parser("cancel", parents=[common], help="cancel a batch; prints it as JSON")
    cancel.set_defaults(run=run_batch_cancel)
    cancel.add_argument("batch_id")

    listing = actions.add_parser(
        "list", parents=[common], help="your batches, newest first: one line each (status, counts)"
    )
    listing.set_defaults(run=run_batch_list)
    listing.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_BATCH_LIST_PAGE,
        metavar="N",
        help=f"batches to list, 1..{MAX_BATCH_LIST_PAGE} (default %(default)s)",
    )
    listing.add_argument(
        "--offset", type=int, default=0, metavar="N", help="skip the N newest (the next page's offset)"
    )
    listing.add_argument("--json", action="store_true", help="print the page as JSON (with next_offset)")


def _add_wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output-dir", type=Path, metavar="DIR", help="where the images go (default: ./BATCH_ID/)"
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="give up waiting after this many seconds (exit 3)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


# --- the request -------------------------------------------------------------------------------------------


def batch_from_args(args: argparse.Namespace) -> CreateBatch:
    """The batch the flags (or ``--file``) describe, validated here with the server's own rules."""
    if args.file is not None:
        mixed = [flag for flag in ("--prompt", "--seeds", "--count") if _given(args, flag)]
        mixed += given_flags(args)
        if mixed:
            raise UsageError(
                f"--file lists the requests itself: it cannot be combined with {', '.join(mixed)}"
            )
        body = read_batch_file(args.file)
    else:
        body = _template_body(args)
    try:
        return CreateBatch.model_validate(body)
    except ValidationError as exc:
        raise UsageError("invalid batch:\n" + describe_validation(exc, _BATCH_FLAGS)) from None


def _given(args: argparse.Namespace, flag: str) -> bool:
    return getattr(args, flag.removeprefix("--")) is not None


def _template_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.prompt is None:
        raise UsageError("batch create needs --prompt (with --seeds or --count), or --file")
    if args.seeds is None and args.count is None:
        raise UsageError("--prompt needs --seeds (one item per seed) or --count (how many items)")
    body: dict[str, Any] = {"template": {**request_fields(args), "prompt": args.prompt}}
    if args.seeds is not None:
        body["seeds"] = parse_seeds(args.seeds)
    else:
        body["count"] = args.count
    return body


def parse_seeds(text: str) -> list[int]:
    """``1-8``, ``1,5,9`` or a mix (``1-4,10``) → the seeds in order. The count is checked before any
    range is expanded, so a typo like ``0-4294967295`` is refused instead of filling memory."""
    spans: list[tuple[int, int]] = []
    for part in text.split(","):
        match = _SEED_SPAN.fullmatch(part.strip())
        if match is None:
            raise UsageError(f"--seeds {text}: {part.strip()!r} is not a seed or a range like 1-8")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise UsageError(f"--seeds {text}: the range {part.strip()} runs backwards")
        spans.append((first, last))
    total = sum(last - first + 1 for first, last in spans)
    if total > MAX_BATCH_ITEMS:
        raise UsageError(f"--seeds {text}: {total} seeds, but a batch holds at most {MAX_BATCH_ITEMS} items")
    return [seed for first, last in spans for seed in range(first, last + 1)]


def read_batch_file(path: str) -> dict[str, Any]:
    """The body ``--file`` describes: a JSON array is the ``requests``, a JSON object the whole body, and a
    ``.jsonl``/``.ndjson`` file one request a line. Chosen by the name rather than guessed from the content:
    a one-line JSON Lines file is also a JSON object, and guessing wrong would send the wrong batch."""
    text = _read_text(path)
    if Path(path).suffix.lower() in _JSON_LINES_SUFFIXES:
        return {"requests": [_json(line, path, number) for number, line in _lines(text)]}
    data = _json(text, path)
    if isinstance(data, list):
        return {"requests": data}
    if isinstance(data, dict):
        return data
    raise UsageError(f"--file {path}: expected a JSON array of requests or a batch object")


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--file: {exc.strerror or exc}: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--file {path}: not UTF-8 text") from None


def _lines(text: str) -> list[tuple[int, str]]:
    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _json(text: str, path: str, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {line}" if line is not None else f"line {exc.lineno} column {exc.colno}"
        hint = "" if line is not None else " (JSON Lines files must end in .jsonl or .ndjson)"
        raise UsageError(f"--file {path}, {where}: not valid JSON: {exc.msg}{hint}") from None


# --- commands ----------------------------------------------------------------------------------------------


def run_batch_create(args: argparse.Namespace) -> int:
    if not args.wait:  # the user expects files or a deadline: say why there will be neither
        unused = [
            flag
            for flag, value in (("-o", args.output_dir), ("--timeout", args.timeout))
            if value is not None
        ]
        if unused:
            raise UsageError(
                f"{' and '.join(unused)} without --wait: nothing would be waited for or downloaded "
                "(add --wait, or later run `darkroom batch wait BATCH_ID -o DIR`)"
            )
    body = batch_from_args(args)
    started = time.monotonic()
    with open_client(args) as client:
        batch = client.create_batch(body, idempotency_key=args.idempotency_key)
        if not args.wait:
            print_json(batch.model_dump(mode="json"))
            return EXIT_OK
        return _wait_and_download(client, args, batch, started, cancel_on_interrupt=True)


def run_batch_wait(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with open_client(args) as client:
        batch = client.get_batch(args.batch_id, limit=0)
        return _wait_and_download(client, args, batch, started, cancel_on_interrupt=False)


def run_batch_get(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        print_json(client.get_batch(args.batch_id).model_dump(mode="json"))
    return EXIT_OK


def run_batch_list(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= MAX_BATCH_LIST_PAGE:
        raise UsageError(f"--limit {args.limit}: a page lists 1..{MAX_BATCH_LIST_PAGE} batches")
    if args.offset < 0:
        raise UsageError(f"--offset {args.offset}: must be 0 or more")
    with open_client(args) as client:
        page = client.list_batches(offset=args.offset, limit=args.limit)
    if args.json:
        print_json(page.model_dump(mode="json"))
        return EXIT_OK
    for batch in page.data:
        print(batch_line(batch), flush=True)
    if page.next_offset is not None:
        say(f"more: darkroom batch list --offset {page.next_offset} --limit {args.limit}")
    return EXIT_OK


def batch_line(batch: Batch) -> str:
    """``batch_…  completed  2026-11-22T10:00:00+00:00  3 items: 2 succeeded, 1 failed`` (the one column
    of varying width last, so the others line up)."""
    counts = batch.counts
    states = ", ".join(
        f"{number} {name}"
        for number, name in (
            (counts.succeeded, "succeeded"),
            (counts.failed, "failed"),
            (counts.canceled, "canceled"),
            (counts.running, "running"),
            (counts.queued, "queued"),
        )
        if number
    )
    items = f"{counts.total} item{'' if counts.total == 1 else 's'}" + (f": {states}" if states else "")
    return f"{batch.id}  {batch.status.value:<9}  {batch.created_at.isoformat(timespec='seconds')}  {items}"


def run_batch_cancel(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        batch = client.cancel_batch(args.batch_id)
    if not batch.status.is_terminal:
        say(f"cancel requested: {batch.id}'s running items stop at their next denoising step")
    print_json(batch.model_dump(mode="json"))
    return EXIT_OK


# --- waiting and downloading -------------------------------------------------------------------------------


def _wait_and_download(
    client: DarkroomClient,
    args: argparse.Namespace,
    batch: Batch,
    started: float,
    *,
    cancel_on_interrupt: bool,
) -> int:
    """Wait for every item, download what succeeded, print the summary. Ctrl-C cancels the batch only
    when this command submitted it: ``batch wait`` may be watching someone else's batch."""
    display = None if args.quiet else BatchProgressDisplay(sys.stderr)
    try:
        batch = client.wait_batch(batch, timeout=args.timeout, on_progress=display)
    except KeyboardInterrupt:
        _finish(display)
        if cancel_on_interrupt:
            batch_id = batch.id
            cancel_after_interrupt(
                args, batch_id, lambda client: client.cancel_batch(batch_id).status is BatchStatus.CANCELED
            )
        else:
            say(f"interrupted; the batch goes on: {batch.id}")
        return EXIT_INTERRUPTED
    except BatchWaitTimeout as exc:
        _finish(display)
        say(f"{exc}; it goes on: `darkroom batch wait {batch.id}` or `darkroom batch cancel {batch.id}`")
        return EXIT_UNAVAILABLE
    _finish(display)
    directory = args.output_dir if args.output_dir is not None else Path(batch.id)
    items = batch.items or []
    paths = item_paths(directory, items)
    try:
        for item, item_paths_ in zip(items, paths, strict=True):
            for image, path in zip(item.images, item_paths_, strict=True):
                if image.url is not None:  # None: withheld by the content filter
                    client.download(image, path)
    except ChecksumMismatch as exc:
        say(f"a download of {batch.id} is corrupt: {exc}")
        return EXIT_UNAVAILABLE
    print_json(batch_summary(batch, directory, paths, time.monotonic() - started))
    if batch.counts.succeeded < batch.counts.total:
        say(f"batch {batch.id} {batch.status.value}: {_outcomes(batch)}; each item's error is in the summary")
        return EXIT_JOB_FAILED
    return EXIT_OK


def _finish(display: BatchProgressDisplay | None) -> None:
    if display is not None:
        display.finish()


def _outcomes(batch: Batch) -> str:
    counts = batch.counts
    return (
        f"{counts.succeeded} succeeded, {counts.failed} failed, {counts.canceled} canceled of {counts.total}"
    )


def item_paths(directory: Path, items: list[BatchItem]) -> list[list[Path]]:
    """``DIR/0000.png``, ``DIR/0001.png``, …; image i > 0 of item n is ``DIR/000n-i.EXT``."""
    paths = []
    for index, item in enumerate(items):
        stem = f"{index:04d}"
        paths.append(
            [
                directory / f"{stem}{f'-{i}' if i else ''}.{_extension(image.content_type)}"
                for i, image in enumerate(item.images)
            ]
        )
    return paths


def _extension(content_type: str) -> str:
    return OutputFormat(content_type.removeprefix("image/")).extension


def batch_summary(batch: Batch, directory: Path, paths: list[list[Path]], elapsed_s: float) -> dict[str, Any]:
    """The batch's outcome per item, in submission order, with where each image was saved."""
    items = batch.items or []
    return {
        "id": batch.id,
        "status": batch.status.value,
        "counts": batch.counts.model_dump(),
        "directory": str(directory.resolve()),
        "items": [
            {
                "index": index,
                "id": item.id,
                "status": item.status.value,
                "images": [
                    image_entry(image, path) for image, path in zip(item.images, item_paths_, strict=True)
                ],
                "error": item.error.model_dump() if item.error else None,
            }
            for index, (item, item_paths_) in enumerate(zip(items, paths, strict=True))
        ],
        "elapsed_s": round(elapsed_s, 3),
    }
