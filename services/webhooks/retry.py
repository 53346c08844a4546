"""Retry decisions for webhook delivery, as pure functions.

Why pure: the same rules serve two callers. The blocking ``deliver`` loop sleeps between attempts; an RQ
task makes one attempt per job execution and re-enqueues itself ``next_delay(...)`` seconds later, so a
receiver that is down for an hour does not pin a worker for an hour. Neither caller should re-derive
"is this retryable, and when".

Backoff is exponential with *full jitter* (delay drawn uniformly from ``[0, min(cap, base * 2**(n-1))]``):
when a popular receiver comes back after an outage, spread-out retries do not knock it over again.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum

import httpx

from services.ssrf import UnsafeURLError

#: Statuses that mean "try again later": request timeout, rate limited, and every 5xx.
RETRYABLE_STATUSES = frozenset({408, 429, *range(500, 600)})
_DELAY_SECONDS = re.compile(r"[0-9]{1,10}")


class Verdict(StrEnum):
    """What one attempt means for the message."""

    DELIVERED = "delivered"  # 2xx
    RETRY = "retry"  # transient: network error, timeout, 408, 429, 5xx
    FAILED = "failed"  # permanent: other 4xx, a redirect (not followed), an unsafe URL
    GONE = "gone"  # 410: the receiver asks us to stop; callers should disable the endpoint


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. Defaults: 6 attempts spread over up to ~1 minute of backoff (before jitter)."""

    max_attempts: int = 6
    base_delay_s: float = 2.0
    max_delay_s: float = 300.0
    #: Ceiling on a server's ``Retry-After``, so a receiver cannot park a message for days.
    max_retry_after_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("delays must not be negative")


def classify(outcome: httpx.Response | BaseException) -> Verdict:
    """Map an attempt's response (or the exception it raised) to a ``Verdict``.

    3xx is a failure, not a retry: we never follow redirects (the new location was not vetted by the SSRF
    guard), and asking again would get the same redirect.
    """
    if isinstance(outcome, httpx.Response):
        status = outcome.status_code
        if 200 <= status < 300:
            return Verdict.DELIVERED
        if status == 410:
            return Verdict.GONE
        return Verdict.RETRY if status in RETRYABLE_STATUSES else Verdict.FAILED
    if isinstance(outcome, UnsafeURLError):
        return Verdict.RETRY if outcome.reason == "dns_resolution_failed" else Verdict.FAILED
    if isinstance(outcome, httpx.UnsupportedProtocol):
        return Verdict.FAILED
    if isinstance(outcome, httpx.TransportError):  # connect/read/write/pool timeouts, resets, bad HTTP
        return Verdict.RETRY
    return Verdict.FAILED


def backoff_delay(attempt: int, policy: RetryPolicy, *, rand: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff after attempt number ``attempt`` (1-based)."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2.0 ** min(attempt - 1, 62))
    return rand() * ceiling


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header (delta-seconds or HTTP-date), or None.

    An unparseable value is ignored (None) rather than treated as an error: the backoff still applies.
    A date in the past means "now" (0).
    """
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses as naive; HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def next_delay(
    attempt: int,
    outcome: httpx.Response | BaseException,
    policy: RetryPolicy,
    *,
    rand: Callable[[], float] = random.random,
    now: datetime | None = None,
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``, or None when there must be no further attempt.

    None covers delivered, permanently failed, gone, and out of attempts; ``classify(outcome)`` tells
    which. A server's ``Retry-After`` wins over our backoff (capped by ``policy.max_retry_after_s``):
    it knows its own load better than we do.
    """
    if classify(outcome) is not Verdict.RETRY or attempt >= policy.max_attempts:
        return None
    if isinstance(outcome, httpx.Response):
        retry_after = parse_retry_after(outcome.headers.get("retry-after"), now=now)
        if retry_after is not None:
            return min(retry_after, policy.max_retry_after_s)
    return backoff_delay(attempt, policy, rand=rand)
