"""What every ``darkroom`` command shares: exit codes, how it reports, the connection flags.

Kept apart from the commands so ``generate`` and the ``batch`` commands report the same way — one set of
exit codes, messages on stderr, JSON on stdout — without importing each other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from darkroom_client.client import DEFAULT_URL, DarkroomClient
from darkroom_client.errors import DarkroomError
from schemas.jobs import ImageResult

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Arguments that cannot make a valid request; reported before anything is sent."""


def connection_options() -> argparse.ArgumentParser:
    """``--server`` and ``--api-key``, a parent parser for every command that talks to the API."""
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
    return common


def say(message: str) -> None:
    print(f"darkroom: {message}", file=sys.stderr, flush=True)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False), flush=True)


def open_client(args: argparse.Namespace, timeout: float = 30.0) -> DarkroomClient:
    return DarkroomClient(args.server, api_key=args.api_key, timeout=timeout)


def image_entry(image: ImageResult, path: Path) -> dict[str, Any]:
    """One image in a command's JSON summary: where it was saved and that its bytes checked out — or, for
    an image the content filter withheld (never stored, nothing downloaded), why there is no file."""
    if image.url is None:
        return {
            "path": None,
            "seed": image.seed,
            "finish_reason": image.finish_reason,
            "filter_reason": image.filter_reason,
        }
    return {
        "path": str(path.resolve()),
        "seed": image.seed,
        "width": image.width,
        "height": image.height,
        "content_type": image.content_type,
        "bytes": path.stat().st_size,
        "sha256": image.sha256,
        "sha256_verified": True,  # download() refuses a file whose hash differs
    }


def cancel_after_interrupt(
    args: argparse.Namespace, target_id: str, cancel: Callable[[DarkroomClient], bool]
) -> None:
    """Ctrl-C on the command that submitted a job or batch means "I no longer want it": free the GPUs
    rather than leave orphan work running. ``cancel`` asks for it and says whether it has ended already
    (else it stops at its next step)."""
    try:
        with open_client(args, timeout=5.0) as client:
            ended = cancel(client)
        say(f"interrupted; {'canceled' if ended else 'cancel requested'}: {target_id}")
    except DarkroomError as exc:
        say(f"interrupted; could not cancel {target_id}: {exc.code}")
    except (httpx.HTTPError, KeyboardInterrupt):
        say(f"interrupted; could not reach the server to cancel {target_id}")
