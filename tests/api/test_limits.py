"""Admission limits of the API, against real Redis: a full queue answers 503 + Retry-After, not a backlog."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from api.main import create_app
from devtools.net import free_port
from services.queue import generation_queue
from services.settings import Settings
from tests.api import serve
from tests.fixtures.s3 import FAKE_AWS_ENV


def test_a_full_queue_answers_503_with_retry_after_and_accepts_again_once_drained(
    redis_url: str, redis_client: object, tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path}",
        max_queue_depth=3,
        queue_share_per_key=1,
        queue_full_retry_after=7,
        auth_disabled=True,
    )
    body = {"prompt": "a fox", "width": 512, "height": 512}
    with serve(create_app(settings), lifespan="on") as url, httpx.Client(base_url=url, timeout=10) as client:
        accepted = [client.post("/v1/generations", json=body) for _ in range(3)]
        assert [r.status_code for r in accepted] == [202, 202, 202]
        refused = client.post("/v1/generations", json=body)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "7"
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["code"] == "queue_full"
        assert client.post(f"/v1/generations/{accepted[0].json()['id']}/cancel").status_code == 200
        assert client.post("/v1/generations", json=body).status_code == 202


def test_an_unreachable_object_store_during_an_init_image_upload_is_a_503_and_queues_nothing(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    settings = Settings(
        redis_url=redis_url,
        storage_url="s3://outputs/darkroom",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        auth_disabled=True,
    )
    buffer = io.BytesIO()
    Image.new("RGB", (512, 512), "navy").save(buffer, "PNG")
    body = {"prompt": "a fox", "init_image": base64.b64encode(buffer.getvalue()).decode(), "strength": 0.5}
    with serve(create_app(settings), lifespan="on") as url, httpx.Client(base_url=url, timeout=60) as client:
        refused = client.post("/v1/generations", json=body)
    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["code"] == "storage_unavailable" and int(refused.headers["retry-after"]) >= 1
    assert redis_client.llen(generation_queue(redis_client, settings).key) == 0
    assert not list(redis_client.scan_iter("darkroom:job:*"))
