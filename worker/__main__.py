"""Worker entrypoint.

``python -m worker``            load the model, then serve the generation queue (the production worker)
``python -m worker generate``   run the engine alone on one prompt, no Redis or storage needed
"""

from __future__ import annotations

import argparse
import sys

from worker.cli import add_generate_parser, run_generate

EXIT_MODEL_UNAVAILABLE = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description="darkroom GPU worker")
    subparsers = parser.add_subparsers(dest="command")
    run = subparsers.add_parser("run", help="serve the generation queue (the default)")
    run.add_argument("--burst", action="store_true", help="exit once the queue is empty (tests, batch)")
    add_generate_parser(subparsers)
    args = parser.parse_args(argv)
    if args.command == "generate":
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_generate(args)
    import structlog

    from services.logging import configure_logging
    from services.settings import get_settings
    from worker.errors import ModelUnavailableError
    from worker.service import run_worker

    settings = get_settings()
    configure_logging(settings.environment)
    try:
        return run_worker(settings, burst=bool(getattr(args, "burst", False)))
    except ModelUnavailableError as exc:
        # A distinct exit code, so supervisors (and the local dev launcher) can tell "no model" from a crash.
        structlog.get_logger("worker").error("model unavailable", reason=str(exc))
        return EXIT_MODEL_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
