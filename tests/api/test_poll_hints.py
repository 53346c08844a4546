"""``Retry-After`` on answers about a job that has not ended, and the queue position read in O(1).

The API under uvicorn on a real Redis, no worker: the test moves jobs on through the real lifecycle, as a
worker would.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import redis

from api.main import create_app
from services.jobs import JobStore, Lifecycle
from services.jobs.outcome import Succeeded
from services.queue import job_queue
from services.queue_order import MAX_POLL_S, MAX_RUNNING_POLL_S, MIN_POLL_S
from services.settings import Settings
from tests.api import serve

BODY: dict[str, Any] = {"prompt": "a red fox", "width": 512, "height": 512, "num_inference_steps": 4}


def hint(response: httpx.Response) -> int:
    return int(response.headers["retry-after"])


def test_queued_and_running_jobs_carry_a_bounded_retry_after_and_ended_ones_none(
    redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(redis_url=redis_url, storage_url=f"file://{tmp_path}", auth_disabled=True)
    connection = redis.Redis.from_url(redis_url)
    store, lifecycle = JobStore(connection, timedelta(days=1)), Lifecycle(connection, timedelta(days=1))
    with serve(create_app(settings), lifespan="on") as url, httpx.Client(base_url=url, timeout=30) as client:
        created = [client.post("/v1/generations", json=BODY) for _ in range(3)]
        assert [answer.status_code for answer in created] == [202, 202, 202]
        assert all(MIN_POLL_S <= hint(answer) <= MAX_POLL_S for answer in created)
        ids = [answer.json()["id"] for answer in created]
        reads = [client.get(f"/v1/generations/{job_id}") for job_id in ids]
        assert [read.json()["queue_position"] for read in reads] == [1, 2, 3]
        assert all(MIN_POLL_S <= hint(read) <= MAX_POLL_S for read in reads)

        # A worker takes the first job: it runs, the others move up.
        first = store.get(ids[0])
        assert first is not None
        connection.lrem(job_queue(connection, settings, first).key, 0, ids[0])  # RQ's dequeue
        assert lifecycle.claim(first, "darkroom-w-1").applied
        running = client.get(f"/v1/generations/{ids[0]}")
        assert running.json()["status"] == "running"
        assert MIN_POLL_S <= hint(running) <= MAX_RUNNING_POLL_S
        assert lifecycle.progress(ids[0], "darkroom-w-1", 2, 4)
        assert MIN_POLL_S <= hint(client.get(f"/v1/generations/{ids[0]}")) <= MAX_RUNNING_POLL_S
        assert [client.get(f"/v1/generations/{i}").json()["queue_position"] for i in ids[1:]] == [1, 2]

        claimed = store.get(ids[0])
        assert claimed is not None
        assert lifecycle.finish(claimed, "darkroom-w-1", Succeeded(images=[])).applied
        ended = client.get(f"/v1/generations/{ids[0]}")
        assert ended.json()["status"] == "succeeded" and "retry-after" not in ended.headers
