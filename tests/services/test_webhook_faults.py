"""Fault 5: the webhook receiver is down for a while, or too slow — against the whole running service.

- Down (connection refused) for a while, then back: attempts are retried on the backoff schedule and the
  delivery lands; every attempt, and the final ``delivered`` state, is on the job. Meanwhile the GPU
  worker is never held up: deliveries run in the webhook worker, so the next generation completes while
  the first job's webhook is still being retried.
- Slower than ``DARKROOM_WEBHOOK_TIMEOUT``: each attempt is cut at the timeout and retried.

Covered elsewhere, against the same code paths: 500, 500, then 200 (tests/api/test_generations.py,
``test_webhook_retried_until_delivered_and_verified_independently``); 410 stops at once and no later event
of that job is sent (tests/services/test_webhook_worker.py, ``test_410_and_400_stop_at_once...``, and
tests/services/test_webhook_tasks.py); out of attempts → ``failed`` (test_webhook_tasks.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.http_receiver import HttpReceiver, Reply
from tests.fixtures.stack import ONE_THREAD, Stack, start_stack
from tests.fixtures.tcp_proxy import TcpProxy

SMALL: dict[str, Any] = {"prompt": "a red fox", "width": 512, "height": 512, "num_inference_steps": 2}
TIMEOUT_S = 1.0
BACKOFF_MAX_S = 2.0
SCHEDULER_TICK_S = 1.0  # RQ's scheduler moves due retries to the queue once a second


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack-webhook-faults")
    env = {
        "DARKROOM_WEBHOOK_TIMEOUT": str(TIMEOUT_S),
        "DARKROOM_WEBHOOK_BACKOFF_BASE": "0.25",
        "DARKROOM_WEBHOOK_BACKOFF_MAX": str(BACKOFF_MAX_S),
        "DARKROOM_WEBHOOK_MAX_ATTEMPTS": "15",  # room for a slow GPU job to finish during the outage
    }
    yield from start_stack(
        tmp, f"file://{tmp / 'outputs'}", tiny_model_dir, extra_env=env, process_env=ONE_THREAD
    )


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def only_delivery(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    deliveries = client.get(f"/v1/generations/{job_id}").json()["webhook"]["deliveries"]
    assert len(deliveries) <= 1, deliveries
    return deliveries[0] if deliveries else None


def wait_for_delivery(client: httpx.Client, job_id: str, done: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (delivery := only_delivery(client, job_id)) is None or not done(delivery):
        assert time.monotonic() < deadline, f"delivery not there within {timeout}s: {delivery}"
        time.sleep(0.1)
    return delivery


def gaps(delivery: dict[str, Any]) -> list[float]:
    """Seconds between the starts of consecutive attempts."""
    starts = [datetime.fromisoformat(a["at"].replace("Z", "+00:00")) for a in delivery["attempts"]]
    return [(later - earlier).total_seconds() for earlier, later in zip(starts, starts[1:], strict=False)]


def test_a_receiver_down_for_a_while_gets_the_webhook_and_never_holds_up_the_gpu(
    stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    with TcpProxy("127.0.0.1", webhook_receiver.port) as proxy, stack.client() as client:
        proxy.down()
        down_at = time.monotonic()
        notified = submit(client, {**SMALL, "seed": 1, "webhook_url": proxy.url + "/hook"})
        # No webhook, one step more: the next job on the GPU, not a coalesced partner of the first.
        following = submit(client, {**SMALL, "seed": 2, "num_inference_steps": 3})

        job = stack.wait_for(following, {"succeeded", "failed"})
        assert job["status"] == "succeeded", job
        pending = only_delivery(client, notified)
        assert pending is not None and pending["state"] == "pending", pending  # still being retried
        assert pending["attempts"] and all(a["status_code"] is None for a in pending["attempts"])

        wait_for_delivery(client, notified, lambda d: len(d["attempts"]) >= 3)
        proxy.up()
        up_at = time.monotonic()
        [request] = webhook_receiver.wait_for(1, timeout=BACKOFF_MAX_S + SCHEDULER_TICK_S + 10)
        delivered_after = time.monotonic() - up_at
        delivery = wait_for_delivery(client, notified, lambda d: d["state"] != "pending")

    assert delivery["state"] == "delivered", delivery
    attempts = delivery["attempts"]
    assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
    assert [a["status_code"] for a in attempts] == [None] * (len(attempts) - 1) + [200]
    assert all("ConnectError" in a["error"] for a in attempts[:-1]), attempts
    assert request.headers["webhook-id"] == delivery["msg_id"]
    # On schedule: no gap longer than the backoff cap plus a scheduler tick (and a little slack).
    assert max(gaps(delivery)) <= BACKOFF_MAX_S + SCHEDULER_TICK_S + 1.0, gaps(delivery)
    print(
        f"\nreceiver down {up_at - down_at:.1f}s: {len(attempts) - 1} refused attempts, gaps "
        f"{[round(g, 1) for g in gaps(delivery)]}s; delivered {delivered_after:.1f}s after it came back; "
        f"the next GPU job finished while the webhook was still pending"
    )


def test_a_receiver_slower_than_the_timeout_is_cut_off_and_retried(
    stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    webhook_receiver.script([Reply(200, delay_s=5), Reply(200, delay_s=5), 200])
    with stack.client() as client:
        job_id = submit(client, {**SMALL, "seed": 3, "webhook_url": webhook_receiver.url})
        delivery = wait_for_delivery(client, job_id, lambda d: d["state"] != "pending")

    assert delivery["state"] == "delivered", delivery
    first, second, third = delivery["attempts"]
    for timed_out in (first, second):
        assert timed_out["status_code"] is None and "Timeout" in timed_out["error"], timed_out
        assert TIMEOUT_S * 1000 * 0.9 <= timed_out["duration_ms"] < TIMEOUT_S * 1000 * 2.5, timed_out
    assert third["status_code"] == 200
    received = webhook_receiver.wait_for(3)
    assert {r.headers["webhook-id"] for r in received} == {delivery["msg_id"]}  # one message, three tries
    print(
        f"\nslow receiver (5s > {TIMEOUT_S:.0f}s timeout): attempts cut after "
        f"{first['duration_ms'] / 1000:.2f}s and {second['duration_ms'] / 1000:.2f}s, gaps "
        f"{[round(g, 1) for g in gaps(delivery)]}s, delivered on attempt 3"
    )
