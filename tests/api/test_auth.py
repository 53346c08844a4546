"""API keys and per-key limits, against real Redis: every job belongs to the key that made it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.main import create_app, load_keys
from services.api_keys import hash_key, new_key
from services.settings import Settings
from tests.api import serve

ALICE, BOB = new_key(), new_key()
BODY = {"prompt": "a fox", "width": 512, "height": 512}


@pytest.fixture
def api(redis_url: str, tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path}",
        api_keys=f"alice:sha256:{hash_key(ALICE)},bob:sha256:{hash_key(BOB)}",
        rate_limit_per_minute=6,
        rate_limit_burst=4,
    )
    with serve(create_app(settings), lifespan="on") as url:
        yield url


def client(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=10)


def test_requests_without_a_valid_key_are_401_problems(api: str) -> None:
    for key in (None, "drk_not-a-key"):
        with client(api, key) as anonymous:
            response = anonymous.post("/v1/generations", json=BODY)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["code"] == "unauthorized"
            assert anonymous.get("/v1/generations/gen_x").status_code == 401
    with httpx.Client(base_url=api, headers={"Authorization": f"Basic {ALICE}"}) as wrong_scheme:
        assert wrong_scheme.get("/v1/generations/gen_x").status_code == 401
    with client(api, None) as anonymous:  # probes and the spec stay open
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        assert "bearer" in str(anonymous.get("/openapi.json").json()["components"]["securitySchemes"]).lower()


def test_another_keys_job_is_404_everywhere(api: str) -> None:
    with client(api, ALICE) as alice, client(api, BOB) as bob:
        job_id = alice.post("/v1/generations", json=BODY).json()["id"]
        assert alice.get(f"/v1/generations/{job_id}").status_code == 200
        for response in (
            bob.get(f"/v1/generations/{job_id}"),
            bob.get(f"/v1/generations/{job_id}/events"),
            bob.post(f"/v1/generations/{job_id}/cancel"),
        ):
            assert response.status_code == 404
            assert response.json()["code"] == "not_found"
        unknown = bob.get("/v1/generations/gen_does_not_exist").json()
        assert unknown["title"] == bob.get(f"/v1/generations/{job_id}").json()["title"]
        assert alice.post(f"/v1/generations/{job_id}/cancel").status_code == 200


def test_idempotency_keys_are_scoped_to_the_api_key(api: str) -> None:
    headers = {"Idempotency-Key": "nightly-batch-1"}
    with client(api, ALICE) as alice, client(api, BOB) as bob:
        first = alice.post("/v1/generations", json=BODY, headers=headers).json()["id"]
        again = alice.post("/v1/generations", json=BODY, headers=headers).json()["id"]
        other = bob.post("/v1/generations", json=BODY, headers=headers).json()["id"]
    assert first == again and other != first


def test_submissions_are_rate_limited_per_key_with_retry_after(api: str) -> None:
    with client(api, ALICE) as alice, client(api, BOB) as bob:
        statuses = [alice.post("/v1/generations", json=BODY).status_code for _ in range(5)]
        assert statuses == [202, 202, 202, 202, 429]
        limited = alice.post("/v1/generations", json=BODY)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["code"] == "rate_limited"
        assert bob.post("/v1/generations", json=BODY).status_code == 202
        assert alice.get("/healthz").status_code == 200


def test_the_api_refuses_to_start_without_keys_unless_auth_is_explicitly_off(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="DARKROOM_API_KEYS"):
        load_keys(Settings(storage_url=f"file://{tmp_path}"))
    assert load_keys(Settings(auth_disabled=True)) is None
