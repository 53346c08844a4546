"""Single delivery attempts, in-process, against real Redis and a real loopback receiver.

Each job is moved to its state through the real lifecycle (which appends its events to the outbox) and
its first attempt scheduled by the real outbox dispatcher; then ``run_delivery_attempt`` is called
directly (no RQ worker): each test drives one attempt at a time and looks at what it left behind — the
delivery record on the job, the next attempt in RQ's scheduled registry, the requests the receiver saw.
``test_webhook_worker.py`` runs the same flow through a real ``python -m services.webhooks`` process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from rq import Queue
from rq.job import Job as RQJob
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer
from standardwebhooks.webhooks import Webhook

from schemas.jobs import JobErrorCode, JobStatus
from services.clients import ServiceClients, build_clients
from services.jobs.outcome import Failed, Succeeded
from services.queue import webhook_queue
from services.settings import Settings
from services.storage import FileStorage, image_key
from services.webhooks.dispatcher import OutboxDispatcher
from services.webhooks.scheduling import DEFAULT_TASK_TIMEOUT, task_job_id
from services.webhooks.signing import generate_secret
from services.webhooks.tasks import DeliveryContext, WebhookConfigError, run_delivery_attempt
from tests.fixtures.http_receiver import HttpReceiver, RecordedRequest, Reply
from tests.fixtures.jobs import queued_job

SECRET = generate_secret()
PUBLIC_URL = "http://darkroom.test"


def make_settings(redis_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a loopback receiver over plain http, fast backoff, and a file:// store in tmp_path."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "storage_url": f"file://{tmp_path / 'objects'}",
        "public_url": PUBLIC_URL,
        "webhook_secret": SECRET,
        "webhook_allow_private": True,
        "webhook_allow_http": True,
        "webhook_timeout": timedelta(seconds=2),
        "webhook_backoff_base": timedelta(seconds=0.2),
        "webhook_max_attempts": 4,
        **overrides,
    }
    return Settings(**values)


def create_job(
    clients: ServiceClients,
    storage: FileStorage | None,
    webhook_url: str | None,
    *,
    events: Sequence[str] = ("completed",),
    status: JobStatus = JobStatus.SUCCEEDED,
    owner: str = "anonymous",
) -> str:
    """A job of API key ``owner`` moved to ``status`` by the real lifecycle, as the API and a GPU worker
    would (its events are in the outbox); a succeeded job gets one stored image."""
    webhook = {"url": webhook_url, "events": list(events)} if webhook_url else None
    record = queued_job(clients.redis, webhook=webhook, owner=owner)
    lifecycle = clients.lifecycle
    if status is JobStatus.CANCELED:
        assert lifecycle.cancel_queued(record.id, "canceled while queued").applied
        return record.id
    if status is JobStatus.QUEUED:
        return record.id
    assert lifecycle.claim(record, "worker-a").applied
    images = []
    if status is JobStatus.SUCCEEDED and storage is not None:
        key = image_key(record.id, 0, "png", record.created_at)
        storage.put(key, b"\x89PNG fake", "image/png")
        image = {"key": key, "seed": 1, "width": 1024, "height": 1024, "content_type": "image/png"}
        images = [{**image, "sha256": "0", "finish_reason": "stop"}]
    outcomes: dict[JobStatus, Succeeded | Failed] = {
        JobStatus.SUCCEEDED: Succeeded(images=images),
        JobStatus.FAILED: Failed(JobErrorCode.OUT_OF_MEMORY, "out of memory"),
    }
    outcome = outcomes.get(status)
    if outcome is not None:
        assert lifecycle.finish(record, "worker-a", outcome).applied
    return record.id


def dispatch(clients: ServiceClients, queue: Queue) -> list[str]:
    """What the webhook process's outbox dispatcher does with what is in the outbox now: each event's
    delivery recorded and its first attempt queued. Returns the msg_ids of the deliveries it scheduled."""
    dispatcher = OutboxDispatcher(
        redis=clients.redis,
        store=clients.store,
        queue=queue,
        task_timeout=DEFAULT_TASK_TIMEOUT,
        claim_idle=timedelta(seconds=30),
    )
    before = set(queue.job_ids)
    dispatcher.drain()
    return [
        job_id.removeprefix("webhook-").rsplit("-", 1)[0] for job_id in queue.job_ids if job_id not in before
    ]


def schedule(clients: ServiceClients, queue: Queue, job_id: str) -> str:
    """The one delivery the job's events led to: its msg_id."""
    [msg_id] = dispatch(clients, queue)
    assert clients.store.get_delivery(job_id, msg_id) is not None
    return msg_id


def verified(request: RecordedRequest) -> dict[str, Any]:
    """Check the signature with the independent reference library, as a receiver would; return the body."""
    payload: dict[str, Any] = Webhook(SECRET).verify(request.body, request.headers)
    return payload


def attempts_made(clients: ServiceClients, job_id: str) -> int:
    return sum(len(d["attempts"]) for d in clients.store.deliveries(job_id))


def counter(outcome: str) -> float:
    return REGISTRY.get_sample_value("darkroom_webhook_attempts_total", {"outcome": outcome}) or 0.0


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return make_settings(redis_url, tmp_path)


@pytest.fixture
def clients(settings: Settings) -> Iterator[ServiceClients]:
    built = build_clients(settings)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def storage(clients: ServiceClients) -> FileStorage:
    assert isinstance(clients.storage, FileStorage)
    return clients.storage


@pytest.fixture
def queue(clients: ServiceClients, settings: Settings) -> Queue:
    return webhook_queue(clients.redis, settings)


@pytest.fixture
def ctx(clients: ServiceClients) -> DeliveryContext:
    # rand=1.0: the backoff is exactly its ceiling (0.2 s, 0.4 s, ...), so scheduled times are predictable.
    return dataclasses.replace(DeliveryContext.from_clients(clients), rand=lambda: 1.0)


# --- one attempt at a time --------------------------------------------------------------------------------


def test_delivered_payload_is_signed_and_carries_the_job_with_fresh_urls(
    ctx: DeliveryContext, clients: ServiceClients, storage: FileStorage, webhook_receiver: HttpReceiver
) -> None:
    job_id = create_job(clients, storage, webhook_receiver.url)
    msg_id = schedule(clients, ctx.queue, job_id)
    before = counter("delivered")

    assert run_delivery_attempt(ctx, job_id, msg_id, 1) == "delivered"

    [request] = webhook_receiver.wait_for(1)
    body = verified(request)
    assert request.headers["webhook-id"] == msg_id
    [delivery] = clients.store.deliveries(job_id)
    assert body["type"] == "generation.succeeded"
    assert body["timestamp"] == delivery["created_at"]
    data = body["data"]
    assert data["id"] == job_id and data["status"] == "succeeded"
    assert data["request"]["prompt"] == "x"
    assert "deliveries" not in data["webhook"]
    url = data["images"][0]["url"]
    assert url.startswith(f"{PUBLIC_URL}/v1/files/")
    # The URL was signed with the key every process shares, so the API can verify it.
    record = clients.store.get(job_id)
    assert record is not None
    key = record.images[0]["key"]
    query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
    assert storage.verify_url(key, query["expires"], query["signature"])

    assert delivery["state"] == "delivered"
    assert [a["status_code"] for a in delivery["attempts"]] == [200]
    assert delivery["attempts"][0]["attempt"] == 1
    assert counter("delivered") == before + 1
    assert ScheduledJobRegistry(queue=ctx.queue).count == 0


def test_retryable_failure_schedules_the_next_attempt_with_the_same_msg_id(
    ctx: DeliveryContext, clients: ServiceClients, storage: FileStorage, webhook_receiver: HttpReceiver
) -> None:
    webhook_receiver.script([500, 200])
    job_id = create_job(clients, storage, webhook_receiver.url)
    msg_id = schedule(clients, ctx.queue, job_id)
    before = counter("retry")

    assert run_delivery_attempt(ctx, job_id, msg_id, 1) == "retrying"

    [delivery] = clients.store.deliveries(job_id)
    assert delivery["state"] == "pending"
    assert [a["status_code"] for a in delivery["attempts"]] == [500]
    assert counter("retry") == before + 1
    scheduled = ScheduledJobRegistry(queue=ctx.queue)
    assert scheduled.get_job_ids() == [task_job_id(msg_id, 2)]
    next_job = RQJob.fetch(task_job_id(msg_id, 2), connection=clients.redis, serializer=JSONSerializer)
    assert list(next_job.args) == [job_id, msg_id, 2]
    assert next_job.timeout == int(ctx.task_timeout.total_seconds())

    # What the scheduler would run next:
    assert run_delivery_attempt(ctx, job_id, msg_id, 2) == "delivered"

    first, second = webhook_receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == msg_id
    assert verified(first)["type"] == verified(second)["type"] == "generation.succeeded"
    [delivery] = clients.store.deliveries(job_id)
    assert delivery["state"] == "delivered"
    assert [(a["attempt"], a["status_code"]) for a in delivery["attempts"]] == [(1, 500), (2, 200)]


def test_retry_after_from_the_receiver_sets_the_delay(
    ctx: DeliveryContext, clients: ServiceClients, storage: FileStorage, webhook_receiver: HttpReceiver
) -> None:
    webhook_receiver.script([Reply(503, headers={"Retry-After": "30"})])
    job_id = create_job(clients, storage, webhook_receiver.url)
    msg_id = schedule(clients, ctx.queue, job_id)

    assert run_delivery_attempt(ctx, job_id, msg_id, 1) == "retrying"

    when = ScheduledJobRegistry(queue=ctx.queue).get_scheduled_time(task_job_id(msg_id, 2))
    assert timedelta(seconds=28) <= when - datetime.now(UTC) <= timedelta(seconds=31)


def test_out_of_attempts_the_delivery_fails(
    ctx: DeliveryContext, clients: ServiceClients, storage: FileStorage, webhook_receiver: HttpReceiver
) -> None:
    webhook_receiver.script([500, 502])
    ctx = dataclasses.replace(ctx, policy=dataclasses.replace(ctx.policy, max_attempts=2))
    job_id = create_job(clients, storage, webhook_receiver.url)
    msg_id = schedule(clients, ctx.queue, job_id)

    assert run_delivery_attempt(ctx, job_id, msg_id, 1) == "retrying"
    assert run_delivery_attempt(ctx, job_id, msg_id, 2) == "failed"

    [delivery] = clients.store.deliveries(job_id)
    assert delivery["state"] == "failed"
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 502]
    assert ScheduledJobRegistry(queue=ctx.queue).get_job_ids() == [task_job_id(msg_id, 2)]  # only attempt 2


@pytest.mark.parametrize(("status", "state"), [(410, "gone"), (400, "failed"), (302, "failed")])
def test_permanent_answers_stop_at_once(
    ctx: DeliveryContext,
    clients: ServiceClients,
    storage: FileStorage,
    webhook_receiver: HttpReceiver,
    status: int,
    state: str,
) -> None:
    webhook_receiver.script(
        [Reply(status, headers={"Location": "http://127.0.0.1:9/"} if status == 302 else {})]
    )
    job_id = create_job(clients, storage, webhook_receiver.url)
    msg_id = schedule(clients, ctx.queue, job_id)

    assert run_delivery_attempt(ctx, job_id, msg_id, 1) == state

    [delivery] = clients.store.deliveries(job_id)
    assert delivery["state"] == state
    assert [a["status_code"] for a in delivery["attempts"]] == [status]
    assert ScheduledJobRegistry(queue=ctx.queue).count == 0


def test_after_410_no_further_event_of_the_job_is_scheduled(
    ctx: DeliveryContext, clients: ServiceClients, storage: FileStorage, webhook_receiver: HttpReceiver
) -> None:
    webhook_receiver.script([410])
    job_id = create_job(
        clients, storage, webhook_receiver.url, events=["started", "completed"], status=JobStatus.RUNNING
    )
    msg_id = schedule(clients, ctx.queue, job_id)  # generation.started
    assert run_delivery_attempt(ctx, job_id, msg_id, 1) == "gone"

    record = clients.store.get(job_id)
    assert record is not None
    assert clients.lifecycle.finish(record, "worker-a", Succeeded(images=[])).applied
    assert dispatch(clients, ctx.queue) == []  # generation.succeeded was in the outbox, and was dropped
    assert len(clients.store.deliveries(job_id)) == 1


def test_an_unsafe_target_fails_without_sending(
    ctx: DeliveryContext, clients: ServiceClients, storage: FileStorage, webhook_receiver: HttpReceiver
) -> None:
    ctx = dataclasses.replace(ctx, allow_private=False)
    job_id = create_job(clients, storage, webhook_receiver.url)
    msg_id = schedule(clients, ctx.queue, job_id)

    assert run_delivery_attempt(ctx, job_id, msg_id, 1) == "failed"

    [attempt] = clients.store.deliveries(job_id)[0]["attempts"]
    assert attempt["status_code"] is None and "private_address" in attempt["error"]
    assert webhook_receiver.requests == []


def test_a_repeated_or_stale_attempt_sends_nothing(
    ctx: DeliveryContext, clients: ServiceClients, storage: FileStorage, webhook_receiver: HttpReceiver
) -> None:
    job_id = create_job(clients, storage, webhook_receiver.url)
    msg_id = schedule(clients, ctx.queue, job_id)
    assert run_delivery_attempt(ctx, job_id, msg_id, 1) == "delivered"

    assert run_delivery_attempt(ctx, job_id, msg_id, 1) == "skipped"  # RQ ran the task twice
    assert run_delivery_attempt(ctx, job_id, "msg_unknown", 1) == "skipped"
    assert run_delivery_attempt(ctx, "gen_expired", msg_id, 1) == "skipped"
    assert len(webhook_receiver.requests) == 1
    assert attempts_made(clients, job_id) == 1


def test_without_a_signing_secret_the_delivery_fails_loudly(
    ctx: DeliveryContext, clients: ServiceClients, storage: FileStorage, webhook_receiver: HttpReceiver
) -> None:
    ctx = dataclasses.replace(ctx, secret=None)
    job_id = create_job(clients, storage, webhook_receiver.url)
    msg_id = schedule(clients, ctx.queue, job_id)

    with pytest.raises(WebhookConfigError):
        run_delivery_attempt(ctx, job_id, msg_id, 1)

    [delivery] = clients.store.deliveries(job_id)
    assert delivery["state"] == "failed"
    assert delivery["attempts"][0]["error"] == "not sent: webhook signing is not configured"
    assert webhook_receiver.requests == []


def test_file_url_signing_key_is_shared_through_redis(settings: Settings, clients: ServiceClients) -> None:
    """Two processes without DARKROOM_URL_SIGNING_KEY sign and verify with the same key."""
    other = build_clients(settings)
    try:
        mine, theirs = clients.storage, other.storage
        assert isinstance(mine, FileStorage) and isinstance(theirs, FileStorage)
        url = mine.url_for("a/b.png", timedelta(minutes=5))
        query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
        assert theirs.verify_url("a/b.png", query["expires"], query["signature"])
    finally:
        other.close()
