"""A GPU worker SIGKILLed mid-job: the job runs again and succeeds within 60 s, with one success webhook."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from tests.fixtures.http_receiver import HttpReceiver
from tests.fixtures.stack import TEST_WEBHOOK_SECRET, Stack, start_stack


@pytest.fixture
def stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Stack]:
    yield from start_stack(tmp_path, f"file://{tmp_path / 'outputs'}", tiny_model_dir)


def test_a_killed_workers_job_is_picked_up_again_and_succeeds_once(
    stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    body = {
        "prompt": "a red fox",
        "width": 512,
        "height": 512,
        "num_inference_steps": 40,
        "seed": 3,
        "webhook_url": webhook_receiver.url + "/hook",
    }
    with stack.client() as client:
        job_id = client.post("/v1/generations", json=body).json()["id"]
        deadline = time.monotonic() + 60
        while (job := client.get(f"/v1/generations/{job_id}").json())["progress"] is None:
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
    assert job["status"] == "running"

    stack.processes["worker"].kill()  # SIGKILL: no cleanup, no warm shutdown
    stack.processes["worker"].wait(timeout=10)
    killed_at = time.monotonic()
    stack.start_worker("worker-2")

    done = stack.wait_for(job_id, {"succeeded", "failed", "canceled"}, timeout=60)
    assert done["status"] == "succeeded", done
    assert time.monotonic() - killed_at < 60
    assert len(done["images"]) == 1

    [delivery] = webhook_receiver.wait_for(1, timeout=30)
    payload = Webhook(TEST_WEBHOOK_SECRET).verify(delivery.body, dict(delivery.headers))
    assert payload["type"] == "generation.succeeded" and payload["data"]["id"] == job_id
    with pytest.raises(AssertionError):  # and no second one: the dead run never reached a terminal state
        webhook_receiver.wait_for(2, timeout=3)
