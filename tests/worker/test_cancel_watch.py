"""Cancel requests pushed to the worker: heard between steps without a Redis command, none missed."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import redis as redis_lib

from schemas.jobs import JobStatus
from services.jobs import Lifecycle
from services.jobs.keys import cancel_channel, job_key
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
        watch.expect(record.id)
        claimed = lifecycle.claim(record.id, "worker-a")
        assert claimed.applied and claimed.record is not None and claimed.record.cancel_requested
        before = commands_processed(redis_client)
        watch.watch(record.id, claimed.record.cancel_requested)  # the claim read the flag: no read here
        assert watch.requested(record.id)
        assert commands_processed(redis_client) - before == 1  # INFO's own
        watch.forget(record.id)
        assert not watch.requested(record.id)
        # Without the claim's flag (a caller that did not read it), the watch reads it once itself.
        watch.watch(record.id)
        assert watch.requested(record.id)
    finally:
        watch.close()


def test_a_request_published_between_the_claim_and_watch_is_not_lost(redis_client: redis_lib.Redis) -> None:
    """The claim read no flag, the request came the moment after (published to us, since the job was
    ours), and its message was drained — by another job's check — before the job was watched."""
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    watch = CancelWatch(redis_client, lifecycle, "worker-a", fallback_s=3600.0)  # no periodic read
    watch.start()
    try:
        other = running_job(redis_client, lifecycle, "worker-a")
        watch.watch(other.id, False)
        record = queued_job(redis_client)
        watch.expect(record.id)  # as the runner does, before claiming
        claimed = lifecycle.claim(record.id, "worker-a")
        assert claimed.applied and claimed.record is not None and not claimed.record.cancel_requested
        assert lifecycle.request_cancel(record.id) is JobStatus.RUNNING  # published to worker-a
        assert lifecycle.request_cancel(other.id) is JobStatus.RUNNING  # and this one after it
        # Hearing the other job's request drains the first message too, before the job is watched.
        assert eventually(lambda: watch.requested(other.id))
        before = commands_processed(redis_client)
        watch.watch(record.id, claimed.record.cancel_requested)
        assert watch.requested(record.id)
        assert commands_processed(redis_client) - before == 1  # INFO's own: nothing was read
    finally:
        watch.close()


def test_a_job_expected_but_not_claimed_is_forgotten_and_never_read(redis_client: redis_lib.Redis) -> None:
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    watch = CancelWatch(redis_client, lifecycle, "worker-a", fallback_s=0.0)  # a read at every check
    watch.start()
    try:
        record = running_job(redis_client, lifecycle, "worker-b")  # another worker's
        watch.expect(record.id)
        assert not lifecycle.claim(record.id, "worker-a").applied
        before = commands_processed(redis_client)
        assert not watch.requested(record.id)  # expected only: its flag is the claim's to read
        assert commands_processed(redis_client) - before == 1
        watch.forget(record.id)
        redis_client.publish(cancel_channel("worker-a"), record.id)  # a stray message: not ours
        other = running_job(redis_client, lifecycle, "worker-a")
        watch.watch(other.id, False)
        redis_client.publish(cancel_channel("worker-a"), other.id)
        assert eventually(lambda: watch.requested(other.id))
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


def test_a_request_lost_while_redis_restarted_between_claim_and_watch_is_read_all_the_same(
    fresh_redis_server: RedisServerFactory,
) -> None:
    """The claim's flag predates the outage: the resubscription, not the claim, has the last word."""
    server = fresh_redis_server()
    connection = redis_lib.Redis.from_url(server.url)
    lifecycle = Lifecycle(connection, timedelta(days=1))
    watch = CancelWatch(connection, lifecycle, "worker-a", fallback_s=3600.0)  # no periodic read
    watch.start()
    try:
        other = running_job(connection, lifecycle, "worker-a")
        watch.watch(other.id, False)
        record = queued_job(connection)
        watch.expect(record.id)
        claimed = lifecycle.claim(record.id, "worker-a")
        assert claimed.applied and claimed.record is not None and not claimed.record.cancel_requested
        server.stop()
        server.restart()
        connection.hset(job_key(record.id), "cancel_requested", "1")  # published to nobody
        assert not watch.requested(other.id)  # the resubscription is heard here, before the watch
        watch.watch(record.id, claimed.record.cancel_requested)
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
