"""The stack every benchmark runs on: the one launcher (``devtools/stack.py``) in production mode.

Production mode runs the API as Dockerfile.api does (JSON logs, uvloop + httptools, uvicorn's access log off
because the app writes its own line, N uvicorn workers). Auth is on with hashed keys checked on every
request, and the per-key rate limiter runs with limits far above the offered load (its cost is measured,
it never binds); the queue-depth ceiling is raised so a submission burst is measured, not refused.
"""

from __future__ import annotations

from pathlib import Path

from devtools.stack import Stack
from services.api_keys import new_key

API_KEYS = 8  # clients of the benchmark rotate over this many keys (each request checks the key ring)
UNBOUND_LIMITS = {
    "DARKROOM_RATE_LIMIT_PER_MINUTE": "100000000",
    "DARKROOM_RATE_LIMIT_BURST": "10000000",
    "DARKROOM_MAX_QUEUE_DEPTH": "1000000",
    # Every read takes a token as in production (its cost is part of what is measured), none is refused.
    "DARKROOM_READ_RATE_LIMIT_PER_MINUTE": "100000000",
    "DARKROOM_READ_RATE_LIMIT_BURST": "10000000",
    "DARKROOM_BATCH_ITEMS_PER_MINUTE": "100000000",
    "DARKROOM_BATCH_ITEMS_BURST": "10000000",
}


def bench_stack(
    tmp: Path,
    *,
    api_workers: int = 1,
    worker: bool = True,
    webhooks: bool = True,
    extra_env: dict[str, str] | None = None,
) -> Stack:
    """A production-mode stack under ``tmp`` with fresh API keys; start it with ``with``."""
    return Stack(
        tmp,
        env={**UNBOUND_LIMITS, **(extra_env or {})},
        production=True,
        api_workers=api_workers,
        worker=worker,
        webhooks=webhooks,
        api_keys={f"bench-{i}": new_key() for i in range(API_KEYS)},
    )
