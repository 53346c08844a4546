"""Fault 4: S3 unavailable while a worker uploads.

The stack's S3 endpoint is a TCP proxy in front of the moto server, so "S3 is down" is exact: every
connection is cut and new ones are refused, while moto (and its buckets) carry on behind it.

- An outage shorter than ``DARKROOM_STORAGE_RETRY_DEADLINE``: the upload is retried with backoff and the
  job succeeds once S3 is back.
- A longer one: the job fails with ``storage_unavailable`` and a message saying so, keeping its request,
  which resubmits as is (same seed) once S3 is back.
- Meanwhile the API keeps answering: it signs URLs locally and never calls S3 for reads or submissions.

Scaled down for the default run (deadline 8 s, outage 4 s). The production figures (deadline 60 s, a
30 s outage) are the same test with ``DARKROOM_FAULT_S3_DEADLINE_S=60 DARKROOM_FAULT_S3_OUTAGE_S=30``;
both are recorded in docs/operate/reliability.md. Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.s3 import FAKE_AWS_ENV, MotoServer, s3_client
from tests.fixtures.stack import ONE_THREAD, Stack, start_stack
from tests.fixtures.tcp_proxy import TcpProxy

DEADLINE_S = float(os.environ.get("DARKROOM_FAULT_S3_DEADLINE_S", "8"))
OUTAGE_S = float(os.environ.get("DARKROOM_FAULT_S3_OUTAGE_S", "4"))
BUCKET = "darkroom-outage"
SMALL: dict[str, Any] = {"prompt": "a lighthouse", "width": 512, "height": 512, "num_inference_steps": 2}
_RETRY_LINE = re.compile(r"^(\S+Z) .*storage\.retry.*")


@pytest.fixture(scope="module")
def s3_proxy(moto_server: MotoServer) -> Iterator[TcpProxy]:
    with TcpProxy(moto_server.host, moto_server.port) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, s3_proxy: TcpProxy
) -> Iterator[Stack]:
    s3_client(s3_proxy.url).create_bucket(Bucket=BUCKET)
    env = {
        **FAKE_AWS_ENV,
        "DARKROOM_S3_ENDPOINT_URL": s3_proxy.url,
        "DARKROOM_STORAGE_RETRY_DEADLINE": str(DEADLINE_S),
    }
    yield from start_stack(
        tmp_path_factory.mktemp("stack-s3-outage"),
        f"s3://{BUCKET}/out",
        tiny_model_dir,
        extra_env=env,
        process_env=ONE_THREAD,
    )


@pytest.fixture
def s3_back_up(s3_proxy: TcpProxy) -> Iterator[TcpProxy]:
    """Whatever a test does, S3 is up again after it."""
    yield s3_proxy
    s3_proxy.up()


def retry_times(stack: Stack, job_id: str) -> list[float]:
    """Wall-clock times (epoch seconds) of the worker's upload retries for ``job_id``."""
    log = (stack.log_dir / "worker.log").read_text(errors="replace")
    return [
        datetime.fromisoformat(match.group(1)).timestamp()
        for line in log.splitlines()
        if job_id in line and (match := _RETRY_LINE.match(line))
    ]


def wait_for_first_retry(stack: Stack, job_id: str, timeout: float = 60.0) -> float:
    """Block until the worker logs its first upload retry for the job; its time (epoch seconds)."""
    deadline = time.monotonic() + timeout
    while not (times := retry_times(stack, job_id)):
        assert time.monotonic() < deadline, f"no upload retry within {timeout}s:\n{stack.logs('worker')}"
        time.sleep(0.1)
    return times[0]


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text  # no S3 call on the submission path
    return str(response.json()["id"])


def test_an_outage_shorter_than_the_deadline_is_retried_through(stack: Stack, s3_back_up: TcpProxy) -> None:
    assert OUTAGE_S < DEADLINE_S
    with stack.client() as client:
        s3_back_up.down()
        job_id = submit(client, {**SMALL, "seed": 11})
        first_failure = wait_for_first_retry(stack, job_id)
        time.sleep(max(0.0, first_failure + OUTAGE_S - time.time()))  # the outage, as the upload sees it
        assert client.get(f"/v1/generations/{job_id}").json()["status"] == "running"
        s3_back_up.up()
        back_at = time.time()
        job = stack.wait_for(job_id, {"succeeded", "failed"}, timeout=DEADLINE_S + 30)
    assert job["status"] == "succeeded", job
    completed = datetime.fromisoformat(job["completed_at"].replace("Z", "+00:00")).timestamp()
    assert httpx.get(job["images"][0]["url"], timeout=10).status_code == 200
    retries = retry_times(stack, job_id)
    print(
        f"\nS3 outage {OUTAGE_S:.0f}s (deadline {DEADLINE_S:.0f}s): {len(retries)} upload retries over "
        f"{retries[-1] - first_failure:.1f}s; job done {completed - back_at:.1f}s after S3 came back, "
        f"{completed - first_failure:.1f}s after the first failed upload"
    )


def test_an_outage_past_the_deadline_fails_clearly_and_keeps_the_request(
    stack: Stack, s3_back_up: TcpProxy
) -> None:
    with stack.client() as client:
        s3_back_up.down()
        job_id = submit(client, {**SMALL, "seed": 12})
        first_failure = wait_for_first_retry(stack, job_id)
        job = stack.wait_for(job_id, {"succeeded", "failed"}, timeout=DEADLINE_S + 60)
        failed_at = datetime.fromisoformat(job["completed_at"].replace("Z", "+00:00")).timestamp()
        assert job["status"] == "failed", job
        assert job["error"]["type"] == "storage_unavailable"
        assert "unreachable" in job["error"]["message"]
        assert job["images"] == []
        assert (job["request"]["seed"], job["request"]["prompt"]) == (12, SMALL["prompt"])
        assert failed_at - first_failure >= DEADLINE_S - 1  # retried for the whole deadline first

        s3_back_up.up()  # the client resubmits the stored request unchanged: same seed, same image
        again = stack.wait_for(submit(client, job["request"]), {"succeeded", "failed"}, timeout=60)
    assert again["status"] == "succeeded", again
    assert again["images"][0]["seed"] == 12
    print(
        f"\nS3 down past the deadline ({DEADLINE_S:.0f}s): job failed storage_unavailable "
        f"{failed_at - first_failure:.1f}s after the first failed upload"
    )
