"""``python -m services.webhooks [--burst]``: run the webhook delivery worker (configured by DARKROOM_*)."""

from __future__ import annotations

import argparse
import sys

from services.settings import get_settings
from services.webhooks.worker import run_worker, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.webhooks", description="darkroom webhook delivery worker"
    )
    parser.add_argument(
        "--burst",
        action="store_true",
        help="exit once the queue is empty (retries not yet due stay scheduled)",
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    setup_logging(settings)
    return run_worker(settings, burst=args.burst)


if __name__ == "__main__":
    sys.exit(main())
