"""What every ``darkroom`` command shares: exit codes, how it reports, the connection flags.

Kept apart from the commands so ``generate`` and the ``batch`` commands report the same way — one set of
exit codes, messages on stderr, JSON on stdout — without importing each other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from darkroom_client.client import DEFAULT_URL, DarkroomClient
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
