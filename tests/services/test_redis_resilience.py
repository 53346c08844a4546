"""The pieces that let workers ride out a Redis restart, one by one (the whole story, with real processes,
is tests/api/test_redis_outage.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib
from rq import Queue
from rq.worker import WorkerStatus

from services.clients import make_redis, retry_while_redis_down
from services.rq_workers import ResilientScheduler, ResilientWorker
from tests.fixtures.redis import RedisServerFactory


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def flaky(failures: int) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def operation() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise redis_lib.ConnectionError("Connection refused")
        return "ok"

    return calls, operation


def test_retry_while_redis_down_backs_off_until_redis_answers() -> None:
    clock = FakeClock()
    calls, operation = flaky(5)
    result = retry_while_redis_down(
        operation, what="t", deadline_s=60, sleep=clock.sleep, clock=clock, jitter=lambda: 1.0
    )
    assert result == "ok" and len(calls) == 6
    assert clock.sleeps == [0.25, 0.5, 1.0, 2.0, 2.0]  # doubling, capped at 2 s
    clock, (calls, operation) = FakeClock(), flaky(3)
    retry_while_redis_down(
        operation, what="t", deadline_s=60, sleep=clock.sleep, clock=clock, jitter=lambda: 0.0
    )
    assert clock.sleeps == [0.125, 0.25, 0.5]  # jittered down by up to half


def test_retry_while_redis_down_gives_up_at_the_deadline_or_on_a_stop_request() -> None:
    clock = FakeClock()
    _, operation = flaky(100)
    with pytest.raises(redis_lib.ConnectionError):
        retry_while_redis_down(operation, what="t", deadline_s=5, sleep=clock.sleep, clock=clock)
    assert clock.now == pytest.approx(5.0)
    calls, operation = flaky(100)
    with pytest.raises(redis_lib.ConnectionError):
        retry_while_redis_down(operation, what="t", should_stop=lambda: True, sleep=clock.sleep, clock=clock)
    assert len(calls) == 1


def test_retry_while_redis_down_lets_other_errors_through_at_once() -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise redis_lib.ResponseError("WRONGTYPE")

    with pytest.raises(redis_lib.ResponseError):
        retry_while_redis_down(broken, what="t", sleep=lambda _: None)
    assert calls == [1]


def test_the_client_fails_fast_when_redis_is_down(fresh_redis_server: RedisServerFactory) -> None:
    server = fresh_redis_server()
    client = make_redis(server.url)
    assert client.ping()
    server.stop()
    with pytest.raises(redis_lib.ConnectionError):
        client.ping()
    server.restart()
    assert client.ping()  # the pooled connection died with the server: the client reconnects by itself


def test_the_resilient_worker_starts_a_resilient_scheduler(redis_url: str) -> None:
    connection = redis_lib.Redis.from_url(redis_url)
    worker = ResilientWorker([Queue("hooks", connection=connection)], connection=connection)
    assert not worker.stopped_on_request
    worker._start_scheduler(burst=True)  # burst: enqueues what is due, then lets go of the lock
    assert isinstance(worker.scheduler, ResilientScheduler)


def test_a_stop_request_and_the_teardown_during_an_outage_raise_nothing(
    fresh_redis_server: RedisServerFactory,
) -> None:
    server = fresh_redis_server()
    connection = make_redis(server.url)
    worker = ResilientWorker([Queue("q", connection=connection)], connection=connection)
    worker.set_state(WorkerStatus.BUSY)
    server.stop()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # RQ writes the request to Redis from inside the SIGTERM handler, i.e. from inside the running job:
        # an error there would fail the very job a warm shutdown means to let finish.
        worker.request_stop(signal.SIGTERM, None)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert worker.stopped_on_request
    worker.teardown()  # the worker's key expires by itself


# A process that holds a Redis connection, forks a child (as the worker forks its scheduler) that closes
# what it inherited unless told not to, then waits in a blocking dequeue on that connection.
_FORKS_THEN_DEQUEUES = """
import os, sys, time
import redis
from services.rq_workers import _close_inherited_redis_connections
connection = redis.Redis.from_url(sys.argv[1])
connection.ping()
child = os.fork()
if child == 0:
    if sys.argv[2] == "close":
        _close_inherited_redis_connections()
    time.sleep(30)
    os._exit(0)
print(child, flush=True)
connection.blpop(["probe"], timeout=0)
"""


def test_a_forked_child_does_not_keep_a_killed_workers_dequeue_alive(redis_url: str) -> None:
    """Why a webhook attempt once vanished from its queue in a long test run: a webhook worker killed
    while waiting in its dequeue left that socket open in its scheduler child, so Redis handed the next
    job on the queue to a dead process. The scheduler now closes the connections it inherited (without
    that call — ``keep`` — the pushed job is taken and this test fails)."""
    client = redis_lib.Redis.from_url(redis_url)
    process = subprocess.Popen(
        [sys.executable, "-c", _FORKS_THEN_DEQUEUES, redis_url, "close"],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    child = int(process.stdout.readline())
    try:
        blocked = lambda: client.info("clients")["blocked_clients"]  # noqa: E731
        deadline = time.monotonic() + 10
        while blocked() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert blocked() == 1
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 2
        while blocked() and time.monotonic() < deadline:
            time.sleep(0.02)
        client.rpush("probe", "job")
        assert client.llen("probe") == 1  # not taken by a dequeue nobody will ever read
    finally:
        os.kill(child, signal.SIGKILL)
        client.close()
