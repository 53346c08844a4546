"""The launcher's sharing: an API put in front of the session's backend runs on its own settings, serves
jobs through the backend's worker, and stops alone."""

from __future__ import annotations

from pathlib import Path

import httpx

from devtools.stack import TINY_WORKERS, Stack
from services.api_keys import new_key

TINY_JOB = {"prompt": "a red fox", "width": 512, "height": 512, "num_inference_steps": 2}


def test_an_api_in_front_of_the_backend_has_its_own_settings_and_stops_alone(
    shared_backend: Stack, tmp_path: Path
) -> None:
    shared_backend.wait_idle()
    with Stack(tmp_path, api_keys={"alice": new_key()}, backend=shared_backend) as front:
        assert front.redis_url == shared_backend.redis_url
        assert front.env["DARKROOM_AUTH_DISABLED"] == "false"  # the backend's processes run with auth off
        assert httpx.get(f"{front.api_url}/v1/generations/gen_x", timeout=10).status_code == 401
        with front.client() as client:  # carries alice's key
            job = client.post("/v1/generations", json=TINY_JOB, headers={"Prefer": "wait=60"}).json()
        assert job["status"] == "succeeded", job
        assert job["images"][0]["url"].startswith(front.api_url)  # signed for this API, its public URL
        api = front.processes["api"]
    assert api.poll() is not None and front.processes == {}
    assert shared_backend.processes["worker"].poll() is None
    assert shared_backend.processes["webhooks"].poll() is None
    with shared_backend.redis() as connection:
        assert connection.smembers(TINY_WORKERS)
