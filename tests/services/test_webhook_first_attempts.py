"""First attempts sent by the outbox dispatcher's event loop (``services.webhooks.first_attempts``), against
a real Redis and real loopback receivers: each event is sent once, recorded and acknowledged in one
transaction; a burst to one receiver waits for its share in the loop, and past the wait is parked
behind the share; an attempt whose recording failed is left pending and sent again, with its id, by
whoever claims it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from redis import Redis
from rq.registry import ScheduledJobRegistry

from services.clients import ServiceClients, build_clients
from services.jobs import outbox
from services.jobs.keys import OUTBOX, OUTBOX_GROUP
from services.queue import webhook_queue
from services.settings import Settings
from services.storage import FileStorage
from services.webhooks.dispatcher import OutboxDispatcher
from services.webhooks.first_attempts import FirstAttemptSender, share_wait_s
from services.webhooks.hosts import HostLimiter, host_key
from services.webhooks.parking import parked_count
from services.webhooks.scheduling import DEFAULT_TASK_TIMEOUT
from services.webhooks.tasks import DeliveryContext
from tests.fixtures.http_receiver import HttpReceiver, Reply
from tests.fixtures.redis import RedisServerFactory
from tests.services import test_webhook_tasks as task_tests
from tests.services.test_webhook_tasks import create_job, make_settings, verified

settings = task_tests.settings
clients = task_tests.clients
storage = task_tests.storage


def dispatcher_with_sender(
    clients: ServiceClients,
    *,
    concurrency: int = 16,
    per_host: int = 4,
    share_wait: float = 5.0,
    claim_idle: timedelta = timedelta(seconds=30),
    redis_retry_deadline_s: float = 5.0,
    ctx: DeliveryContext | None = None,
) -> OutboxDispatcher:
    """The webhook process's dispatcher and sender (``services.webhooks.worker``), with shares of its own."""
    ctx = ctx or DeliveryContext.from_clients(clients)
    ctx = dataclasses.replace(ctx, limiter=HostLimiter(per_host), key_limiter=HostLimiter(64))
    dispatcher = OutboxDispatcher(
        redis=clients.redis,
        store=clients.store,
        queue=webhook_queue(clients.redis, clients.settings),
        task_timeout=DEFAULT_TASK_TIMEOUT,
        claim_idle=claim_idle,
        block=timedelta(milliseconds=50),
    )
    dispatcher.sender = FirstAttemptSender(
        ctx,
        on_acknowledged=dispatcher.count_acknowledged,
        concurrency=concurrency,
        share_wait_s=share_wait,
        timeout_s=5.0,
        redis_retry_deadline_s=redis_retry_deadline_s,
    )
    return dispatcher


@pytest.fixture
def made() -> Iterator[list[OutboxDispatcher]]:
    """Dispatchers a test made: their senders are stopped at the end."""
    dispatchers: list[OutboxDispatcher] = []
    yield dispatchers
    for dispatcher in dispatchers:
        assert dispatcher.sender is not None
        dispatcher.sender.stop(timeout=10)


def pending(redis: Redis) -> int:
    return int(redis.xpending(OUTBOX, OUTBOX_GROUP)["pending"])


def test_each_event_is_sent_once_and_recorded_with_its_entry_acknowledged(
    clients: ServiceClients,
    storage: FileStorage,
    webhook_receiver: HttpReceiver,
    made: list[OutboxDispatcher],
) -> None:
    job_ids = [create_job(clients, storage, webhook_receiver.url) for _ in range(3)]
    dispatcher = dispatcher_with_sender(clients)
    made.append(dispatcher)
    assert dispatcher.drain() == 3
    requests = webhook_receiver.wait_for(3)
    assert sorted(verified(r)["data"]["id"] for r in requests) == sorted(job_ids)
    for job_id in job_ids:
        [delivery] = clients.store.deliveries(job_id)
        assert delivery["state"] == "delivered" and [a["status_code"] for a in delivery["attempts"]] == [200]
    assert {r.headers["webhook-id"] for r in requests} == {
        d["msg_id"] for job_id in job_ids for d in clients.store.deliveries(job_id)
    }
    assert webhook_queue(clients.redis, clients.settings).count == 0  # nothing went through RQ
    assert pending(clients.redis) == 0 and clients.redis.xlen(OUTBOX) == 0
    assert dispatcher.drain() == 0
    time.sleep(0.2)
    assert len(webhook_receiver.requests) == 3  # handled events are not sent again


def test_a_burst_to_one_receiver_waits_for_its_share_in_the_loop_not_on_the_queue(
    clients: ServiceClients,
    storage: FileStorage,
    webhook_receiver: HttpReceiver,
    made: list[OutboxDispatcher],
) -> None:
    webhook_receiver.script([Reply(200, delay_s=0.1)] * 8)
    job_ids = [create_job(clients, storage, webhook_receiver.url) for _ in range(8)]
    dispatcher = dispatcher_with_sender(clients, per_host=2)
    made.append(dispatcher)
    assert dispatcher.drain() == 8
    assert len(webhook_receiver.wait_for(8)) == 8
    # Each went out as attempt 1, two at a time: none was put back on the queue to wait a second or more.
    assert all(len(clients.store.deliveries(job_id)[0]["attempts"]) == 1 for job_id in job_ids)
    queue = webhook_queue(clients.redis, clients.settings)
    assert ScheduledJobRegistry(queue=queue).get_job_ids() == [] and queue.count == 0


def test_past_its_share_wait_an_attempt_is_parked_behind_the_share(
    clients: ServiceClients,
    storage: FileStorage,
    webhook_receiver: HttpReceiver,
    made: list[OutboxDispatcher],
) -> None:
    webhook_receiver.script([Reply(200, delay_s=1.0)])
    job_ids = [create_job(clients, storage, webhook_receiver.url) for _ in range(3)]
    dispatcher = dispatcher_with_sender(clients, per_host=1, share_wait=0.1)
    made.append(dispatcher)
    assert dispatcher.drain() == 3  # one sent, two parked: all three entries done with
    host = host_key(webhook_receiver.url)
    assert parked_count(clients.redis, "host", host) == 2
    assert ScheduledJobRegistry(queue=webhook_queue(clients.redis, clients.settings)).count == 0
    states = sorted(len(clients.store.deliveries(job_id)[0]["attempts"]) for job_id in job_ids)
    assert states == [0, 0, 1] and pending(clients.redis) == 0


def test_no_more_is_read_than_the_sender_has_room_for(
    clients: ServiceClients,
    storage: FileStorage,
    webhook_receiver: HttpReceiver,
    made: list[OutboxDispatcher],
) -> None:
    """What is not read stays the group's lag — the figure KEDA scales the webhook process on."""
    webhook_receiver.script([Reply(200, delay_s=1.0)] * 2)
    for _ in range(5):
        create_job(clients, storage, webhook_receiver.url)
    dispatcher = dispatcher_with_sender(clients, concurrency=2)
    made.append(dispatcher)
    outbox.ensure_group(clients.redis)
    assert dispatcher.run_once() == 2
    assert dispatcher.run_once() == 0  # both in flight: nothing read (after waiting ``block``)
    [group] = clients.redis.xinfo_groups(OUTBOX)
    last = group["last-delivered-id"].decode()
    assert len(clients.redis.xrange(OUTBOX, min=f"({last}") or []) == 3 and group["pending"] == 2
    assert dispatcher.drain() == 5  # the two in flight, then the other three
    assert len(webhook_receiver.wait_for(5)) == 5


def test_stop_lets_the_attempts_in_flight_finish_and_be_recorded(
    clients: ServiceClients,
    storage: FileStorage,
    webhook_receiver: HttpReceiver,
    made: list[OutboxDispatcher],
) -> None:
    webhook_receiver.script([Reply(200, delay_s=0.6)])
    job_id = create_job(clients, storage, webhook_receiver.url)
    dispatcher = dispatcher_with_sender(clients)
    dispatcher.start()
    webhook_receiver.wait_for(1)  # attempt 1 is in flight
    stopping = threading.Thread(target=dispatcher.stop)
    stopping.start()
    stopping.join(0.2)
    assert stopping.is_alive(), "stop returned while an attempt was in flight"
    stopping.join(10)
    assert not stopping.is_alive()
    assert clients.store.deliveries(job_id)[0]["state"] == "delivered"
    assert pending(clients.redis) == 0


def test_without_a_signing_secret_the_delivery_fails_as_not_sent(
    clients: ServiceClients,
    storage: FileStorage,
    webhook_receiver: HttpReceiver,
    made: list[OutboxDispatcher],
) -> None:
    job_id = create_job(clients, storage, webhook_receiver.url)
    ctx = dataclasses.replace(DeliveryContext.from_clients(clients), secret=None)
    dispatcher = dispatcher_with_sender(clients, ctx=ctx)
    made.append(dispatcher)
    assert dispatcher.drain() == 1
    [delivery] = clients.store.deliveries(job_id)
    assert delivery["state"] == "failed"
    assert delivery["attempts"][0]["error"] == "not sent: webhook signing is not configured"
    assert webhook_receiver.requests == [] and pending(clients.redis) == 0


def test_an_attempt_not_recorded_for_want_of_redis_is_sent_again_with_its_id(
    fresh_redis_server: RedisServerFactory,
    tmp_path: Path,
    webhook_receiver: HttpReceiver,
    made: list[OutboxDispatcher],
) -> None:
    """Redis goes away while the receiver answers: the attempt cannot be recorded, so its entry stays
    pending; once Redis is back, another consumer claims it and sends it again (same ``webhook-id``)."""
    server = fresh_redis_server()
    settings: Settings = make_settings(server.url, tmp_path)
    built = build_clients(settings)
    try:
        assert isinstance(built.storage, FileStorage)
        job_id = create_job(built, built.storage, webhook_receiver.url)
        webhook_receiver.script([Reply(200, delay_s=0.5)])
        first = dispatcher_with_sender(built, redis_retry_deadline_s=0.3)
        made.append(first)
        outbox.ensure_group(built.redis)
        assert first.run_once() == 1
        webhook_receiver.wait_for(1)
        server.stop()  # AOF written: the entry (read, pending) and the pending delivery survive
        assert first.sender is not None and first.sender.wait_idle(10)  # gave up recording it
        server.restart()
        assert pending(built.redis) == 1
        assert built.store.deliveries(job_id)[0]["attempts"] == []

        survivor = dispatcher_with_sender(built, claim_idle=timedelta(milliseconds=1))
        made.append(survivor)
        assert survivor.drain() == 1
        first_request, second_request = webhook_receiver.wait_for(2)
        assert first_request.headers["webhook-id"] == second_request.headers["webhook-id"]
        [delivery] = built.store.deliveries(job_id)
        assert delivery["state"] == "delivered" and len(delivery["attempts"]) == 1
        assert pending(built.redis) == 0
    finally:
        built.close()


def test_the_share_wait_keeps_waiting_plus_the_attempt_inside_the_claim_idle() -> None:
    assert share_wait_s(timedelta(seconds=30), timedelta(seconds=15)) == 5.0
    assert share_wait_s(timedelta(seconds=30), timedelta(seconds=24)) == 3.0
    assert share_wait_s(timedelta(seconds=10), timedelta(seconds=15)) == 0.0
