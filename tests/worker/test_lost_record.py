"""A job record that vanishes under its run (issue #16, case 12): Redis restarted without its AOF, or
the keys flushed. Nothing may write a partial record back (no status, no TTL), the worker treats the job
as gone and takes the next one, and a partial record that exists anyway reads as no job (404), never a 500.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.jobs import job_key
from tests.fixtures.stack import ONE_THREAD, Stack, start_stack

LONG: dict[str, Any] = {"prompt": "a long one", "width": 512, "height": 512, "num_inference_steps": 60}
SMALL: dict[str, Any] = {"prompt": "the next one", "width": 512, "height": 512, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    """A stack of its own: the test flushes its Redis."""
    tmp = tmp_path_factory.mktemp("stack-lost-record")
    yield from start_stack(tmp, f"file://{tmp / 'outputs'}", tiny_model_dir, process_env=ONE_THREAD)


def wait_for_log(stack: Stack, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in stack.logs("worker"):
        assert time.monotonic() < deadline, stack.logs("worker")
        assert stack.processes["worker"].poll() is None, stack.logs("worker")
        time.sleep(0.05)


def test_a_record_flushed_under_a_running_job_stays_gone_and_the_worker_goes_on(stack: Stack) -> None:
    redis = stack.redis()
    with stack.client() as client:
        job_id = client.post("/v1/generations", json=LONG).json()["id"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/generations/{job_id}").json()["progress"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        redis.flushall()  # Redis restarted without its AOF: every key is gone, the run goes on
        wait_for_log(stack, "result discarded")  # the run ended, and recorded nothing
        # No write of the run (progress, heartbeat, outcome, events) brought a partial record back.
        assert redis.exists(job_key(job_id), job_key(job_id) + ":events") == 0
        assert client.get(f"/v1/generations/{job_id}").status_code == 404
        assert stack.processes["worker"].poll() is None, stack.logs("worker")

        # The worker takes the next job (RQ re-registers the worker on its next heartbeat).
        next_id = client.post("/v1/generations", json=SMALL).json()["id"]
        ended = stack.wait_for(next_id, {"succeeded", "failed", "canceled"}, timeout=90)
        assert ended["status"] == "succeeded"


def test_a_partial_record_reads_as_no_job(stack: Stack) -> None:
    """A hash with fields but no status (what an unguarded write would leave) is a 404, not a 500."""
    redis = stack.redis()
    partial = "gen_" + "0" * 32
    redis.hset(job_key(partial), mapping={"progress": '{"step": 3, "total": 60}', "heartbeat_at": "x"})
    with stack.client() as client:
        response = client.get(f"/v1/generations/{partial}")
        assert response.status_code == 404, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert client.get(f"/v1/generations/{partial}/events").status_code in (404, 200)
