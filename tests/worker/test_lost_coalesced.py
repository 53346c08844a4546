"""A GPU worker SIGKILLed in the middle of a coalesced call: every job of its group is requeued and succeeds.

Lost-job recovery works per job, from heartbeats: the worker beats every job of its group (not only the
one RQ dequeued), so none is taken for lost while the call runs; once the worker is dead they all go
stale and are requeued, and a second worker runs them (coalesced again, or not: it does not matter).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from services.jobs import JobStore
from tests.fixtures.http_receiver import HttpReceiver
from tests.fixtures.stack import ONE_THREAD, TEST_WEBHOOK_SECRET, Stack, start_stack
from tests.worker.test_coalescing import SMALL, TERMINAL, queue_behind_busy_worker, wait_until

LOST_AFTER_S = 3


def attempt(stack: Stack, job_id: str) -> tuple[str, int]:
    record = JobStore(stack.redis(), timedelta(days=1)).get(job_id)
    assert record is not None
    return record.status.value, record.attempt


def worker_of(stack: Stack, job_id: str) -> str | None:
    record = JobStore(stack.redis(), timedelta(days=1)).get(job_id)
    assert record is not None
    return record.worker


@pytest.fixture
def stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Stack]:
    yield from start_stack(
        tmp_path,
        f"file://{tmp_path / 'outputs'}",
        tiny_model_dir,
        extra_env={
            "DARKROOM_LOST_AFTER": str(LOST_AFTER_S),
            "DARKROOM_HEARTBEAT_INTERVAL": "1",
            "DARKROOM_COALESCE_MAX": "4",  # off by default
        },
        process_env=ONE_THREAD,
    )


@pytest.mark.slow  # about a minute: a stack of its own, a kill, a second worker
def test_every_job_of_a_killed_workers_coalesced_group_is_recovered_and_succeeds_once(
    stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    hook = {"webhook_url": webhook_receiver.url + "/hook"}
    # The most steps a request may ask for: the group must still be running after LOST_AFTER + 1.5 s of
    # waiting below (20 steps were done by then on a quiet machine).
    bodies = [
        {**SMALL, **hook, "prompt": f"job {i}", "seed": 30 + i, "num_inference_steps": 100} for i in range(3)
    ]
    with stack.client() as client:
        ids = queue_behind_busy_worker(client, bodies)
        for job_id in ids:
            wait_until(client, job_id, lambda j: j["progress"] is not None)
        # Longer than LOST_AFTER: the partners' heartbeats keep them from being taken for lost meanwhile.
        time.sleep(LOST_AFTER_S + 1.5)
    assert [attempt(stack, job_id) for job_id in ids] == [("running", 1)] * 3
    # All three running at once on the one worker, which runs one call at a time: they share it.
    assert len({worker_of(stack, job_id) for job_id in ids} - {None}) == 1

    stack.processes["worker"].kill()  # SIGKILL: no cleanup, no warm shutdown
    stack.processes["worker"].wait(timeout=10)
    killed_at = time.monotonic()
    stack.start_worker("worker-2", ONE_THREAD["worker"])
    done = [stack.wait_for(job_id, TERMINAL, timeout=120) for job_id in ids]
    recovered_in = time.monotonic() - killed_at
    assert [job["status"] for job in done] == ["succeeded"] * 3, done
    assert [attempt(stack, job_id) for job_id in ids] == [("succeeded", 2)] * 3

    deliveries = webhook_receiver.wait_for(3, timeout=30)
    payloads = [Webhook(TEST_WEBHOOK_SECRET).verify(d.body, dict(d.headers)) for d in deliveries]
    assert sorted((p["data"]["id"], p["type"]) for p in payloads) == sorted(
        (job_id, "generation.succeeded") for job_id in ids
    )
    with pytest.raises(AssertionError):  # and no more: the dead run never reached a terminal state
        webhook_receiver.wait_for(4, timeout=2)
    print(f"\ngroup of 3 recovered after SIGKILL: all succeeded {recovered_in:.1f}s after the kill")
