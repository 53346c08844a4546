"""Worker entrypoint: ``python -m worker generate ...`` runs the engine alone."""

from __future__ import annotations

import argparse
import logging
import sys

from worker.cli import add_generate_parser, run_generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description="darkroom GPU worker")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        return run_generate(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
