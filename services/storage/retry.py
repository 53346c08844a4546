"""App-level retry for uploads: exponential backoff with full jitter, bounded by a total deadline.

botocore's own retries cover blips of a second or two; an S3 restart or failover takes tens of seconds.
A worker that has just spent GPU time on an image should wait that out rather than fail the job, so
`RetryingStorage` wraps `put` (idempotent: same key, same bytes) and leaves reads alone — the API should
answer fast and let the client retry. Clock, sleep and randomness are injectable for tests.
"""

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import structlog

from services.storage.base import Storage
from services.storage.errors import StorageUnavailable

T = TypeVar("T")
log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry until `deadline_s` after the first attempt; the n-th wait is uniform in
    [0, min(max_delay_s, base_delay_s * 2**n)] ("full jitter"), so many workers hitting the same outage
    do not retry in lockstep. The last attempt starts at the deadline at the latest, so the total time is
    the deadline plus one attempt (itself bounded by botocore's timeouts and retries)."""

    deadline_s: float = 60.0
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.deadline_s < 0 or self.base_delay_s <= 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError(f"invalid retry policy {self}: need deadline >= 0 and 0 < base <= max delay")

    def backoff_cap(self, retry: int) -> float:
        """Upper bound of the wait before retry number `retry` (0-based)."""
        return min(self.max_delay_s, self.base_delay_s * 2.0 ** min(retry, 32))


def call_with_backoff(
    operation: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
    description: str = "storage operation",
) -> T:
    """Run `operation`, retrying on `StorageUnavailable` until the policy's deadline, then re-raising the
    last one. Other errors (bad key, access denied) are not transient and propagate at once.
    `description` names the operation in the retry log lines."""
    deadline = clock() + policy.deadline_s
    retry = 0
    while True:
        try:
            return operation()
        except StorageUnavailable as exc:
            remaining = deadline - clock()
            if remaining <= 0:
                raise
            delay = min(rand() * policy.backoff_cap(retry), remaining)
            log.warning(
                "storage.retry",
                operation=description,
                retry=retry + 1,
                delay_s=round(delay, 3),
                error=str(exc),
            )
            sleep(delay)
            retry += 1


class RetryingStorage:
    """A `Storage` whose `put` and `read` survive outages up to the policy's deadline; the rest delegates."""

    def __init__(
        self,
        inner: Storage,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.inner = inner
        self.policy = policy
        self._sleep = sleep
        self._clock = clock
        self._rand = rand

    def __repr__(self) -> str:
        return f"RetryingStorage({self.inner!r}, {self.policy})"

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """`inner.put`, retried with backoff while the backend is unavailable."""
        call_with_backoff(
            lambda: self.inner.put(key, data, content_type),
            self.policy,
            sleep=self._sleep,
            clock=self._clock,
            rand=self._rand,
            description=f"put {key!r}",
        )

    def read(self, key: str) -> bytes:
        """`inner.read`, retried like `put`: a worker reading an init image rides out the same outages
        its uploads do (a missing object is not an outage and fails at once)."""
        return call_with_backoff(
            lambda: self.inner.read(key),
            self.policy,
            sleep=self._sleep,
            clock=self._clock,
            rand=self._rand,
            description=f"read {key!r}",
        )

    def url_for(self, key: str, expires_in: timedelta) -> str:
        return self.inner.url_for(key, expires_in)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def ping(self) -> None:
        self.inner.ping()

    def close(self) -> None:
        self.inner.close()
