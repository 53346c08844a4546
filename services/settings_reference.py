"""Render every setting of :class:`services.settings.Settings` into ``docs/operate/configuration.md``:
``python -m services.settings_reference [--check]``.

The operator's reference is generated, like ``docs/openapi.json``, so it cannot drift from the code: each
field's environment variable (the ``DARKROOM_`` prefix, or its aliases), type, default, limits and
description come from the class; the sections come from its ``# --- section ---`` comments. ``make lint``
runs ``--check`` (and ``tests/services/test_settings_reference.py`` does the same), which fails with a
diff whenever a field changed without a re-render.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
import types
import typing
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from services.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = ROOT / "docs" / "operate" / "configuration.md"
PREFIX = str(Settings.model_config.get("env_prefix", ""))
_SECTION = re.compile(r"^\s*# --- (?P<title>.+?) -+\s*$")
_FIELD = re.compile(r"^    (?P<name>[a-z_][a-z0-9_]*)\s*:")

HEADER = f"""# Configuration reference

<!-- Generated from services/settings.py by `python -m services.settings_reference`: do not edit by hand.
     `make lint` and tests/services/test_settings_reference.py fail when this file is out of date. -->

Every setting is an environment variable with the `{PREFIX}` prefix, read once at start-up by both
processes (the API and the workers) through one typed class, `services.settings.Settings`: a typo'd or
out-of-range value stops the process with the variable's name. An empty value means unset. Durations take
seconds (`900`) or ISO 8601 (`PT15M`); booleans `true`/`false` (also `1`/`0`, `yes`/`no`). Unless a
description says "API only" or "worker", give both processes the same value.

Variables outside this class: `HF_TOKEN` / `HF_HOME` / `HF_HUB_OFFLINE` (Hugging Face hub, workers),
`AWS_*` (S3 credentials), `UVICORN_*` (the API server), `OMP_NUM_THREADS` (CPU workers sharing a host).
"""


def env_names(name: str, field: FieldInfo) -> list[str]:
    """The variables a field is read from, the current name first (later ones are deprecated aliases)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"{PREFIX}{name}".upper()]


def type_name(annotation: Any) -> str:
    """A reader's name for a field's type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        return " or ".join(parts)
    if origin is Literal:
        values = typing.get_args(annotation)
        if len(values) == 1:
            return f"`{values[0]}`"
        return "one of " + ", ".join(f"`{value}`" for value in values)
    if origin is tuple:
        return "list (comma-separated)"
    if origin is dict:
        return "mapping (JSON object or `name=value,...`)"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        timedelta: "duration",
        Path: "path",
        SecretStr: "secret",
    }.get(annotation, getattr(annotation, "__name__", str(annotation)))


def duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    if seconds == 0:
        return "0 s"
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


def default_text(field: FieldInfo) -> str:
    value = field.default
    if value is PydanticUndefined and field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    if value is None or value in ((), {}):
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, timedelta):
        return duration(value)
    if isinstance(value, int):
        return f"`{value:,}`" if value >= 10_000 else f"`{value}`"
    return f"`{value}`"


def limits(field: FieldInfo) -> str:
    """Bounds and patterns the class enforces, as text."""
    rules: list[str] = []
    for item in field.metadata:
        bound = next(
            (
                (symbol, getattr(item, attr))
                for kind, symbol, attr in ((Ge, "≥", "ge"), (Gt, ">", "gt"), (Le, "≤", "le"), (Lt, "<", "lt"))
                if isinstance(item, kind)
            ),
            None,
        )
        if bound is not None:
            symbol, value = bound
            rules.append(f"{symbol} {duration(value) if isinstance(value, timedelta) else value}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            rules.append(f"matches `{pattern}`")
    return "; ".join(rules)


def sections() -> dict[str, str]:
    """Each field's section, from the ``# --- title ---`` comments in the class's source."""
    section, found = "General", {}
    for line in inspect.getsource(Settings).splitlines():
        if match := _SECTION.match(line):
            section = match["title"].split(" (")[0]
            section = section[0].upper() + section[1:]
        elif (match := _FIELD.match(line)) and match["name"] in Settings.model_fields:
            found[match["name"]] = section
    return found


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    by_section: dict[str, list[str]] = {}
    where = sections()
    for name, field in Settings.model_fields.items():
        names = env_names(name, field)
        variable = f"`{names[0]}`" + (
            " (also read: " + ", ".join(f"`{old}`" for old in names[1:]) + ")" if names[1:] else ""
        )
        description = field.description or ""
        rule = limits(field)
        if rule:
            description = f"{description} ({rule})" if description else rule
        row = (
            f"| {_cell(variable)} | {_cell(type_name(field.annotation))} | {_cell(default_text(field))} "
            f"| {_cell(description)} |"
        )
        by_section.setdefault(where.get(name, "General"), []).append(row)
    parts = [HEADER]
    for section, rows in by_section.items():
        parts.append(f"\n## {section}\n\n| variable | type | default | description |\n|---|---|---|---|\n")
        parts.append("\n".join(rows) + "\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.settings_reference",
        description="Render the configuration reference (docs/operate/configuration.md) from Settings.",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the code")
    parser.add_argument("--output", type=Path, default=DEFAULT_PATH, help=f"default: {DEFAULT_PATH}")
    args = parser.parse_args(argv)
    generated = render()
    path: Path = args.output
    if args.check:
        committed = path.read_text(encoding="utf-8") if path.exists() else ""
        if committed == generated:
            print(f"{path} is up to date")
            return 0
        print(
            f"{path} is out of date with Settings; run `python -m services.settings_reference`:",
            file=sys.stderr,
        )
        diff = difflib.unified_diff(
            committed.splitlines(), generated.splitlines(), "committed", "generated", lineterm="", n=1
        )
        print("\n".join(list(diff)[:60]), file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generated, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
