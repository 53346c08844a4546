"""Upload retries: backoff schedule, deadline and which errors are retried, on a fake clock."""

from datetime import timedelta

import pytest

from services.storage import (
    InvalidKey,
    RetryingStorage,
    RetryPolicy,
    StorageError,
    StorageUnavailable,
    call_with_backoff,
)


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Flaky:
    """Fails with `StorageUnavailable` a set number of times, then returns "ok"."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise StorageUnavailable("endpoint down")
        return "ok"


def test_retries_with_exponential_capped_backoff_until_success() -> None:
    clock, operation = FakeClock(), Flaky(failures=6)
    policy = RetryPolicy(deadline_s=60, base_delay_s=0.5, max_delay_s=4)

    result = call_with_backoff(operation, policy, sleep=clock.sleep, clock=clock, rand=lambda: 1.0)

    assert result == "ok"
    assert operation.calls == 7
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_scales_each_wait_within_its_cap() -> None:
    clock = FakeClock()
    policy = RetryPolicy(deadline_s=60, base_delay_s=1, max_delay_s=8)

    call_with_backoff(Flaky(failures=3), policy, sleep=clock.sleep, clock=clock, rand=lambda: 0.25)

    assert clock.sleeps == [0.25, 0.5, 1.0]


def test_gives_up_at_the_deadline_with_a_last_attempt_on_it() -> None:
    clock, operation = FakeClock(), Flaky(failures=10_000)
    policy = RetryPolicy(deadline_s=30, base_delay_s=1, max_delay_s=8)

    with pytest.raises(StorageUnavailable):
        call_with_backoff(operation, policy, sleep=clock.sleep, clock=clock, rand=lambda: 1.0)

    assert sum(clock.sleeps) == pytest.approx(30)  # waited exactly the deadline, never beyond
    assert clock.sleeps[-1] <= 8
    assert operation.calls == len(clock.sleeps) + 1


def test_zero_deadline_means_a_single_attempt() -> None:
    clock, operation = FakeClock(), Flaky(failures=1)
    with pytest.raises(StorageUnavailable):
        call_with_backoff(operation, RetryPolicy(deadline_s=0), sleep=clock.sleep, clock=clock)
    assert operation.calls == 1


@pytest.mark.parametrize("error", [StorageError("access denied"), InvalidKey("bad key"), ValueError("bad")])
def test_permanent_errors_are_not_retried(error: Exception) -> None:
    clock = FakeClock()
    calls = 0

    def operation() -> None:
        nonlocal calls
        calls += 1
        raise error

    with pytest.raises(type(error)):
        call_with_backoff(operation, RetryPolicy(), sleep=clock.sleep, clock=clock)
    assert calls == 1
    assert clock.sleeps == []


@pytest.mark.parametrize(
    "kwargs",
    [{"deadline_s": -1}, {"base_delay_s": 0}, {"base_delay_s": 2, "max_delay_s": 1}],
)
def test_retry_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="retry policy"):
        RetryPolicy(**kwargs)


class FlakyStorage:
    """A `Storage` whose `put` and `read` each fail a set number of times; records what reached it."""

    def __init__(self, failures: int) -> None:
        self.put_flaky = Flaky(failures)
        self.read_flaky = Flaky(failures)
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.closed = False

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.put_flaky()
        self.objects[key] = (data, content_type)

    def read(self, key: str) -> bytes:
        self.read_flaky()
        return self.objects[key][0]

    def url_for(self, key: str, expires_in: timedelta) -> str:
        return f"https://example.invalid/{key}?ttl={int(expires_in.total_seconds())}"

    def exists(self, key: str) -> bool:
        return key in self.objects

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def ping(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_retrying_storage_retries_put_and_read_and_delegates_the_rest() -> None:
    clock, inner = FakeClock(), FlakyStorage(failures=2)
    storage = RetryingStorage(inner, RetryPolicy(deadline_s=10), sleep=clock.sleep, clock=clock)

    storage.put("a.png", b"data", "image/png")

    assert inner.put_flaky.calls == 3
    assert storage.exists("a.png")
    assert storage.url_for("a.png", timedelta(minutes=1)) == "https://example.invalid/a.png?ttl=60"
    assert storage.read("a.png") == b"data"  # a worker's init image read rides out the outage too
    assert inner.read_flaky.calls == 3
    assert len(clock.sleeps) == 4
    storage.delete("a.png")
    storage.close()
    assert not inner.exists("a.png") and inner.closed
