"""Cancel requests pushed to the worker: heard between steps without a Redis command, none missed."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import redis as redis_lib

from services.jobs import Lifecycle
from services.jobs.keys import job_key
from tests.fixtures.jobs import queued_job, running_job
from tests.fixtures.redis import RedisServerFactory
from worker.cancel_watch import CancelWatch


def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """``condition()`` polled until true (a published message takes a moment to arrive)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def commands_processed(connection: redis_lib.Redis) -> int:
    return int(connection.info("stats")["total_commands_processed"])


def test_a_request_for_a_running_job_is_pushed_to_its_worker_alone(redis_client: redis_lib.Redis) -> None:
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    mine, other = CancelWatch(redis_client, lifecycle, "worker-a"), CancelWatch(redis_client, lifecycle, "b")
    mine.start()
    other.start()
    try:
        record = running_job(redis_client, lifecycle, "worker-a")
        mine.watch(record.id)
        other.watch(record.id)  # a job b does not hold: never pushed to b
        assert not mine.requested(record.id)
        # Between steps no command reaches Redis (INFO itself counts one).
        before = commands_processed(redis_client)
        for _ in range(20):
            assert not mine.requested(record.id)
        assert commands_processed(redis_client) - before == 1
        lifecycle.request_cancel(record.id)
        assert eventually(lambda: mine.requested(record.id))
        assert not other.requested(record.id)
    finally:
        mine.close()
        other.close()


def test_a_request_made_while_the_job_was_queued_is_seen_once_claimed(redis_client: redis_lib.Redis) -> None:
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    watch = CancelWatch(redis_client, lifecycle, "worker-a")
    watch.start()
    try:
        record = queued_job(redis_client)
        lifecycle.request_cancel(record.id)  # marked, published nowhere: no worker holds it yet
        assert lifecycle.claim(record, "worker-a").applied
        watch.watch(record.id)
        assert watch.requested(record.id)
        watch.forget(record.id)
        assert not watch.requested(record.id)
    finally:
        watch.close()


def test_a_request_lost_while_redis_restarted_is_read_on_resubscription(
    fresh_redis_server: RedisServerFactory,
) -> None:
    server = fresh_redis_server()
    connection = redis_lib.Redis.from_url(server.url)
    lifecycle = Lifecycle(connection, timedelta(days=1))
    watch = CancelWatch(connection, lifecycle, "worker-a", fallback_s=3600.0)  # no periodic read
    watch.start()
    try:
        record = running_job(connection, lifecycle, "worker-a")
        watch.watch(record.id)
        server.stop()
        assert not watch.requested(record.id)  # Redis away: keep going
        server.restart()
        # Marked while the worker's subscription was down: the publish went to nobody.
        connection.hset(job_key(record.id), "cancel_requested", "1")
        assert eventually(lambda: watch.requested(record.id))
    finally:
        watch.close()
        connection.close()


def test_the_flag_is_also_read_now_and_then_in_case_the_subscription_died_silently(
    redis_client: redis_lib.Redis,
) -> None:
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    watch = CancelWatch(redis_client, lifecycle, "worker-a", fallback_s=0.2)
    watch.start()
    try:
        record = running_job(redis_client, lifecycle, "worker-a")
        watch.watch(record.id)
        redis_client.hset(job_key(record.id), "cancel_requested", "1")  # no publish
        assert eventually(lambda: watch.requested(record.id))
    finally:
        watch.close()
