"""The ``Prefer`` request header (RFC 7240), of which we honour ``wait=N``."""

from __future__ import annotations

import re

_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,6})\"?", re.IGNORECASE)


def preferred_wait(header: str | None, max_wait_s: float) -> float:
    """Seconds the client is willing to wait, capped at ``max_wait_s``; 0 when absent or malformed."""
    if not header:
        return 0.0
    match = _WAIT.search(header)
    return min(float(match.group(1)), max_wait_s) if match else 0.0
