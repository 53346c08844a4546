"""Export the API's OpenAPI document to ``docs/openapi.json``: ``python -m api.openapi [--check]``.

The committed file is what client generators and reviewers read without running the service, so it must
never drift from the code: CI runs ``--check`` (and ``tests/api/test_openapi.py`` does the same), which
fails with a diff summary whenever a route or schema changed without a re-export.

Building the app connects to nothing: the lifespan (Redis, S3, settings) only runs under a server, and
``app.openapi()`` needs none of it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = ROOT / "docs" / "openapi.json"
_DIFF_LINES = 60


def build_spec() -> dict[str, Any]:
    """The OpenAPI document of a freshly built app (no lifespan run, no connections)."""
    from api.main import create_app

    spec: dict[str, Any] = create_app().openapi()
    return spec


def render(spec: dict[str, Any]) -> str:
    """Canonical text: sorted keys and 2-space indent, so diffs only show real changes."""
    return json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _operations(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{method.upper()} {path}": operation
        for path, item in spec.get("paths", {}).items()
        for method, operation in item.items()
        if isinstance(operation, dict)
    }


def summarize_drift(committed: str, generated: str) -> str:
    """What differs, for a human: operations and schemas added/removed/changed, then a bounded diff."""
    lines: list[str] = []
    new = json.loads(generated)
    try:
        old = json.loads(committed) if committed else {}
    except json.JSONDecodeError:
        old = {}
        lines.append("the committed file is not valid JSON")
    for label, before, after in (
        ("operation", _operations(old), _operations(new)),
        (
            "schema",
            old.get("components", {}).get("schemas", {}),
            new.get("components", {}).get("schemas", {}),
        ),
    ):
        for name in sorted(before.keys() | after.keys()):
            if name not in before:
                lines.append(f"+ {label} {name} (new in code)")
            elif name not in after:
                lines.append(f"- {label} {name} (gone from code)")
            elif before[name] != after[name]:
                lines.append(f"~ {label} {name} changed")
    diff = list(
        difflib.unified_diff(
            committed.splitlines(), generated.splitlines(), "committed", "generated", lineterm="", n=2
        )
    )
    lines += diff[:_DIFF_LINES]
    if len(diff) > _DIFF_LINES:
        lines.append(f"... {len(diff) - _DIFF_LINES} more diff lines")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m api.openapi", description="Export the OpenAPI document to docs/openapi.json."
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the code")
    parser.add_argument("--output", type=Path, default=DEFAULT_PATH, help=f"default: {DEFAULT_PATH}")
    args = parser.parse_args(argv)
    generated = render(build_spec())
    path: Path = args.output
    if args.check:
        committed = path.read_text(encoding="utf-8") if path.exists() else ""
        if not path.exists():
            print(f"{path} does not exist", file=sys.stderr)
        if committed == generated:
            print(f"{path} is up to date")
            return 0
        print(f"{path} is out of date with the code; run `python -m api.openapi`:", file=sys.stderr)
        print(summarize_drift(committed, generated), file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generated, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
