"""How many attempts go to one receiver, or come from one API key, at once: shares of the webhook
process's slots.

Why: a receiver that hangs, or trickles its answer, keeps each attempt sent to it busy up to the attempt
deadline. Without a share, a burst of events for that receiver fills every slot of the webhook process
and everyone else's webhooks wait behind it. With one, that receiver holds at most ``per_host`` slots;
its other attempts are parked until a slot comes free (``services.webhooks.parking``) instead of
waiting inside a slot that others need.

"Host" is the URL's host and port as written (``hooks.example.com:443``): what a receiver controls and
what its capacity is tied to. The count is per webhook process, in memory — nothing to leak when a
process dies; with several webhook processes a receiver sees at most ``per_host`` times their number.

The same counter gives each API key (the job's or batch's ``owner``) its share, ``per_key``: a tenant
with many misbehaving receivers would otherwise hold ``per_host`` slots on each of them and, with enough
hosts, all of them — the per-host share alone protects other receivers, not other tenants.
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
    """Counts attempts in flight per host (or per API key: any string); :meth:`try_acquire` never blocks."""

    def __init__(self, per_host: int) -> None:
        if per_host < 1:
            raise ValueError("the share must be at least 1")
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


_process_limiters: dict[tuple[str, int], HostLimiter] = {}
_process_lock = threading.Lock()


def process_limiter(share: int, scope: str = "host") -> HostLimiter:
    """This process's limiter of ``scope`` (``host`` or ``key``) for ``share`` (one shared by every
    attempt thread; hosts and keys are counted apart)."""
    with _process_lock:
        return _process_limiters.setdefault((scope, share), HostLimiter(share))
