"""Attempts parked behind a busy share (``services.webhooks.parking``), on a real Redis and RQ queue: a
release puts on the queue exactly as many as the process has room for, oldest first, and forgets the
share once its list is empty; a release that fails half-way loses nothing; another process's release in
progress is left alone."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis as redis_lib
from rq import Queue
from rq.serializers import JSONSerializer

from services.queue import WEBHOOK_TASK
from services.webhooks import parking
from services.webhooks.hosts import HostLimiter
from services.webhooks.parking import PARKED_INDEX, ParkedAttempt, Releaser, park, parked_count

HOST = "hooks.example.com:443"


def attempt(n: int) -> ParkedAttempt:
    return ParkedAttempt(task=WEBHOOK_TASK, subject_id=f"gen_{n}", msg_id=f"msg_{n}", attempt=1, waited=1)


def setup(
    redis_client: redis_lib.Redis, parked: int, per_host: int = 2
) -> tuple[Queue, HostLimiter, Releaser]:
    queue = Queue("darkroom-webhooks", connection=redis_client, serializer=JSONSerializer)
    limiter = HostLimiter(per_host)
    for n in range(parked):
        park(redis_client, "host", HOST, attempt(n))
    releaser = Releaser(redis_client, queue, {"host": limiter}, task_timeout=timedelta(seconds=30))
    return queue, limiter, releaser


def queued_messages(queue: Queue) -> list[Any]:
    return [job.args[1] for job in queue.get_jobs()]


def test_a_release_takes_what_the_process_has_room_for_oldest_first(redis_client: redis_lib.Redis) -> None:
    queue, limiter, releaser = setup(redis_client, parked=5)
    assert limiter.try_acquire(HOST)  # one of the host's two slots is busy here

    assert releaser.run_once() == 1
    assert queued_messages(queue) == ["msg_0"]
    assert parked_count(redis_client, "host", HOST) == 4

    limiter.release(HOST)
    assert releaser.run_once() == 2
    assert queued_messages(queue) == ["msg_0", "msg_1", "msg_2"]
    [task] = queue.get_jobs()[:1]
    assert list(task.args) == ["gen_0", "msg_0", 1] and task.kwargs == {"waited": 1}


def test_a_full_share_releases_nothing_and_an_emptied_one_leaves_the_index(
    redis_client: redis_lib.Redis,
) -> None:
    queue, limiter, releaser = setup(redis_client, parked=2)
    assert limiter.try_acquire(HOST) and limiter.try_acquire(HOST)
    assert releaser.run_once() == 0 and queue.count == 0

    limiter.release(HOST)
    limiter.release(HOST)
    assert releaser.run_once() == 2
    assert redis_client.zcard(PARKED_INDEX) == 0 and parked_count(redis_client, "host", HOST) == 0
    park(redis_client, "host", HOST, attempt(9))  # parked again later: indexed again
    assert redis_client.zcard(PARKED_INDEX) == 1


def test_a_release_that_fails_half_way_loses_nothing(
    redis_client: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue, _, releaser = setup(redis_client, parked=3)
    real = parking.enqueue_attempt
    calls = 0

    def fails_second(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise redis_lib.ConnectionError("Redis went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(parking, "enqueue_attempt", fails_second)
    with pytest.raises(redis_lib.ConnectionError):
        releaser.run_once()
    # The first one is queued and still parked (it may run twice: same webhook-id); none is gone.
    assert queued_messages(queue) == ["msg_0"]
    assert parked_count(redis_client, "host", HOST) == 3

    monkeypatch.setattr(parking, "enqueue_attempt", real)
    assert releaser.run_once() == 2  # the lock was given back: the next pass goes on
    assert parked_count(redis_client, "host", HOST) == 1


def test_another_process_releasing_the_share_is_left_alone(redis_client: redis_lib.Redis) -> None:
    queue, _, releaser = setup(redis_client, parked=2)
    redis_client.set(f"darkroom:webhooks:parked-lock:host:{HOST}", "someone-else", px=10_000)
    assert releaser.run_once() == 0 and queue.count == 0
    redis_client.delete(f"darkroom:webhooks:parked-lock:host:{HOST}")
    assert releaser.run_once() == 2
