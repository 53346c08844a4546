"""Redis at ``maxmemory`` under ``noeviction`` (issue #16 case 7), with real processes: a Redis filled until
it refuses writes, an API, a GPU worker on the tiny model.

While Redis is full: every submission is 503 ``redis_out_of_memory`` with ``Retry-After`` (it was a 500
from the admission script's ``-OOM``), reads still work, ``/readyz`` is 503; a worker backs off instead of
dying — one whose job's outcome cannot be written keeps it and records it once Redis takes writes again,
one started meanwhile waits. Once memory is back, every job succeeds, none lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from schemas.problems import PROBLEM_CONTENT_TYPE
from tests.fixtures.stack import Stack, start_stack

LONG = {"prompt": "a red fox", "width": 512, "height": 512, "num_inference_steps": 40, "seed": 3}
SHORT = {**LONG, "num_inference_steps": 2}
HELD_FULL_S = 6.0


@pytest.fixture
def stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Stack]:
    yield from start_stack(tmp_path, f"file://{tmp_path / 'outputs'}", tiny_model_dir)


def fill(connection: redis.Redis) -> None:
    """Make Redis refuse writes as a full one does: filler data, then ``maxmemory`` below what is used
    (setting it first and writing until refused leaves Redis right at the edge, where small writes pass)."""
    connection.config_set("maxmemory-policy", "noeviction")
    for i in range(64):
        connection.set(f"filler:{i}", b"x" * 65536)
    used = int(connection.info("memory")["used_memory"])
    connection.config_set("maxmemory", used // 2)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        connection.set("probe", b"1")


def free(connection: redis.Redis) -> None:
    connection.config_set("maxmemory", 0)


def assert_full(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert response.json()["code"] == "redis_out_of_memory"
    assert int(response.headers["retry-after"]) > 0


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/generations/{job_id}")
    assert response.status_code == 200, response.text  # reads keep working while Redis is full
    body: dict[str, Any] = response.json()
    return body


def test_a_full_redis_is_503_not_ready_and_workers_wait_it_out(stack: Stack) -> None:
    worker = stack.processes["worker"]
    with stack.client() as client, stack.redis() as connection:
        running = client.post("/v1/generations", json=LONG).json()["id"]
        deadline = time.monotonic() + 60
        while job(client, running)["progress"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        fill(connection)  # mid-run: its progress, its outcome and its events cannot be written now
        figures = {
            "POST /v1/generations": client.post("/v1/generations", json=SHORT),
            "POST /v1/batches": client.post("/v1/batches", json={"template": SHORT, "count": 2}),
            "GET /readyz": client.get("/readyz"),
        }
        for route, response in figures.items():
            print(f"Redis full: {route} -> {response.status_code} {response.json().get('code')}")
            assert_full(response)
        time.sleep(HELD_FULL_S)  # the run ends meanwhile; its outcome waits for Redis
        assert worker.poll() is None, stack.logs("worker")
        assert job(client, running)["status"] == "running"  # not lost, not failed

        free(connection)
        assert stack.wait_for(running, {"succeeded", "failed"}, timeout=90)["status"] == "succeeded"
        assert client.get("/readyz").status_code == 200

        # A worker that starts while Redis is full waits for it instead of crash-looping.
        stack.stop_worker()
        queued = client.post("/v1/generations", json=SHORT).json()["id"]
        fill(connection)
        worker_log = stack.log_dir / "worker.log"  # appended to by every worker the stack starts
        readies = worker_log.read_text(errors="replace").count("worker ready")
        stack.start_worker()
        deadline = time.monotonic() + 120
        # Model loaded and "worker ready" logged: next it registers with RQ, which a full Redis refuses.
        while worker_log.read_text(errors="replace").count("worker ready") == readies:
            assert stack.processes["worker"].poll() is None, stack.logs("worker")
            assert time.monotonic() < deadline, stack.logs("worker")
            time.sleep(0.1)
        time.sleep(HELD_FULL_S)
        late = stack.processes["worker"]
        assert late.poll() is None, stack.logs("worker")
        assert job(client, queued)["status"] == "queued"
        free(connection)
        assert stack.wait_for(queued, {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"
        print(f"worker alive through {2 * HELD_FULL_S:.0f} s of a full Redis; both jobs succeeded")
