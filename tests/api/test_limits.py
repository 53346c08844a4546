"""Admission limits of the API, against real Redis: a full queue answers 503 + Retry-After, not a backlog."""

from __future__ import annotations

from pathlib import Path

import httpx

from api.main import create_app
from services.settings import Settings
from tests.api import serve


def test_a_full_queue_answers_503_with_retry_after_and_accepts_again_once_drained(
    redis_url: str, redis_client: object, tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path}",
        max_queue_depth=3,
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
