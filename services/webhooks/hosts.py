"""How many attempts go to one receiver at once: a per-host share of the webhook process's slots.

Why: a receiver that hangs, or trickles its answer, keeps each attempt sent to it busy up to the attempt
deadline. Without a share, a burst of events for that receiver fills every slot of the webhook process
and everyone else's webhooks wait behind it. With one, that receiver holds at most ``per_host`` slots;
its other attempts are put back on the queue a moment later (``services.webhooks.tasks``) instead of
waiting inside a slot that others need.

"Host" is the URL's host and port as written (``hooks.example.com:443``): what a receiver controls and
what its capacity is tied to. The count is per webhook process, in memory — nothing to leak when a
process dies; with several webhook processes a receiver sees at most ``per_host`` times their number.
"""

from __future__ import annotations

import threading
from collections import Counter

import httpx

_DEFAULT_PORTS = {"http": 80, "https": 443}


def host_key(url: str) -> str:
    """``host:port`` of a webhook URL (lower-case, default port filled in); the URL itself if unparseable."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return url
    port = parsed.port if parsed.port is not None else _DEFAULT_PORTS.get(parsed.scheme, 0)
    return f"{parsed.host.lower()}:{port}"


class HostLimiter:
    """Counts attempts in flight per host; :meth:`try_acquire` never blocks."""

    def __init__(self, per_host: int) -> None:
        if per_host < 1:
            raise ValueError("per_host must be at least 1")
        self.per_host = per_host
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()

    def try_acquire(self, host: str) -> bool:
        """Take one of ``host``'s slots if one is free."""
        with self._lock:
            if self._in_flight[host] >= self.per_host:
                return False
            self._in_flight[host] += 1
            return True

    def release(self, host: str) -> None:
        with self._lock:
            self._in_flight[host] -= 1
            if self._in_flight[host] <= 0:
                del self._in_flight[host]

    def in_flight(self, host: str) -> int:
        with self._lock:
            return self._in_flight[host]


_process_limiters: dict[int, HostLimiter] = {}
_process_lock = threading.Lock()


def process_limiter(per_host: int) -> HostLimiter:
    """This process's limiter for ``per_host`` (one shared by every attempt thread)."""
    with _process_lock:
        return _process_limiters.setdefault(per_host, HostLimiter(per_host))
