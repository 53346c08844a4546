"""The same service with S3 storage (moto's server over HTTP), image-to-image, worker metrics, and a warm
shutdown of a busy worker."""

from __future__ import annotations

import base64
import hashlib
import io
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from devtools.net import free_port
from services import metrics
from tests.fixtures.s3 import FAKE_AWS_ENV, MotoServer, s3_client
from tests.fixtures.stack import Stack, start_stack

SMALL: dict[str, Any] = {
    "prompt": "a lighthouse at dusk",
    "width": 512,
    "height": 512,
    "num_inference_steps": 4,
}
BUCKET = "darkroom-e2e"


@pytest.fixture(scope="module")
def s3_stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, moto_server: MotoServer
) -> Iterator[Stack]:
    s3_client(moto_server.endpoint_url).create_bucket(Bucket=BUCKET)
    metrics_port = free_port()
    env = {**FAKE_AWS_ENV, "DARKROOM_S3_ENDPOINT_URL": moto_server.endpoint_url}
    yield from start_stack(
        tmp_path_factory.mktemp("stack-s3"),
        f"s3://{BUCKET}/darkroom",
        tiny_model_dir,
        extra_env=env,
        process_env={"worker": {"DARKROOM_WORKER_METRICS_PORT": str(metrics_port)}},
    )


def submit(stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    with stack.client() as client:
        response = client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def test_images_land_in_s3_privately_and_download_through_presigned_urls(
    s3_stack: Stack, moto_server: MotoServer
) -> None:
    job = s3_stack.wait_for(submit(s3_stack, {**SMALL, "seed": 31, "num_images": 2})["id"], {"succeeded"})
    assert [image["seed"] for image in job["images"]] == [31, 32]
    keys = [
        obj["Key"]
        for obj in s3_client(moto_server.endpoint_url).list_objects_v2(Bucket=BUCKET)["Contents"]
        if job["id"] in obj["Key"]
    ]
    assert sorted(keys)[0].startswith("darkroom/generations/") and len(keys) == 2
    for image in job["images"]:
        url = image["url"]
        assert url.startswith(moto_server.endpoint_url) and "Signature=" in url
        data = httpx.get(url, timeout=10).content
        assert hashlib.sha256(data).hexdigest() == image["sha256"]
        key = url.split(f"/{BUCKET}/")[1].split("?")[0]
        head = s3_client(moto_server.endpoint_url).head_object(Bucket=BUCKET, Key=key)
        assert head["ContentType"] == "image/png"
        assert httpx.get(url.split("?")[0], timeout=10).status_code == 403  # private: no anonymous reads


def test_image_to_image_through_the_api(s3_stack: Stack) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (30, 120, 200)).save(buffer, format="JPEG")
    init = base64.b64encode(buffer.getvalue()).decode()
    body = {"prompt": "the same, at night", "init_image": init, "strength": 0.5, "num_inference_steps": 4}
    created = submit(s3_stack, body)
    assert created["request"]["width"] == 640 and created["request"]["strength"] == 0.5
    assert "init_image" not in created["request"] or created["request"]["init_image"] is None
    job = s3_stack.wait_for(created["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert (job["images"][0]["width"], job["images"][0]["height"]) == (640, 480)
    assert job["progress"] == {"step": 2, "total": 2}  # strength 0.5 of 4 steps
    assert httpx.get(job["init_image_url"], timeout=10).content == buffer.getvalue()


def families(exposition: str) -> set[str]:
    """The ``darkroom_*`` families of a scrape, from its ``# TYPE`` lines, named as in services/metrics.py
    (a counter without ``_total``)."""
    lines = exposition.splitlines()
    return {line.split()[2].removesuffix("_total") for line in lines if line.startswith("# TYPE darkroom_")}


def test_each_process_exports_its_own_metrics_only(s3_stack: Stack) -> None:
    """Issue 15: the API's /metrics has no worker families (no phantom worker at 0 steps/s on the
    dashboard), the worker's none of the API's, and no ``*_created`` series anywhere."""
    s3_stack.wait_for(submit(s3_stack, {**SMALL, "seed": 5})["id"], {"succeeded"})
    text = httpx.get(f"http://127.0.0.1:{s3_stack.worker_metrics_port}/metrics", timeout=10).text
    assert 'darkroom_generation_jobs_total{outcome="succeeded"}' in text
    assert "darkroom_generation_step_seconds_bucket" in text
    assert "darkroom_generation_queue_wait_seconds_count" in text
    assert 'darkroom_worker_ready{model="tiny"} 1.0' in text
    assert 'darkroom_generation_jobs_running{model="tiny"} 0.0' in text
    with s3_stack.client() as client:
        api_text = client.get("/metrics").text
    assert 'darkroom_generation_submissions_total{outcome="accepted"}' in api_text

    api, worker = families(api_text), families(text)
    api_families = {family._name for family in metrics.ROLES["api"]}
    worker_families = {family._name for family in metrics.ROLES["worker"]}
    shared = api_families & worker_families  # outcomes, replica-ack timeouts: both processes end jobs
    assert {metrics.JOBS._name, metrics.REPLICA_ACK_TIMEOUTS._name} <= shared
    api_only, worker_only = api_families - shared, worker_families - shared
    assert api == api_only | shared, api
    assert worker == worker_only | shared, worker
    assert not api & (worker_only | {"darkroom_webhook_attempts"})
    assert not worker & api_only
    for exposition in (api_text, text):
        assert "_created" not in exposition


# Last in the module: it stops the module's worker.
def test_sigterm_lets_the_running_job_finish_then_the_worker_exits_0(s3_stack: Stack) -> None:
    job = submit(s3_stack, {**SMALL, "seed": 77, "num_inference_steps": 60})
    s3_stack.wait_for(job["id"], {"running"})
    worker = s3_stack.processes["worker"]
    worker.send_signal(signal.SIGTERM)
    done = s3_stack.wait_for(job["id"], {"succeeded", "failed", "canceled"}, timeout=120)
    assert done["status"] == "succeeded"
    assert worker.wait(timeout=30) == 0
