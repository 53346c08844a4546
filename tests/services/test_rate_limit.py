"""The Redis token bucket: bursts up to capacity, then one per refill interval, shared by all callers."""

from __future__ import annotations

import threading

import redis as redis_lib

from services.rate_limit import RateLimiter


def test_a_burst_is_allowed_then_refused_with_a_retry_after(redis_url: str) -> None:
    limiter = RateLimiter(redis_lib.Redis.from_url(redis_url), per_minute=60, burst=5)
    decisions = [limiter.take("alice") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[-1].retry_after_s == 1  # one token per second at 60/min
    assert limiter.take("bob").allowed  # buckets are per key


def test_concurrent_callers_cannot_overspend_the_bucket(redis_url: str) -> None:
    limiter = RateLimiter(redis_lib.Redis.from_url(redis_url), per_minute=1, burst=20)
    allowed: list[bool] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(10):
            decision = limiter.take("shared")
            with lock:
                allowed.append(decision.allowed)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(allowed) == 80
    assert sum(allowed) == 20


def test_tokens_refill_over_time(redis_url: str) -> None:
    connection = redis_lib.Redis.from_url(redis_url)
    limiter = RateLimiter(connection, per_minute=60_000, burst=1)  # one token per millisecond
    assert limiter.take("k").allowed
    deadline_hits = [limiter.take("k").allowed for _ in range(200)]
    assert any(deadline_hits)  # within 200 round trips at least one millisecond passed
