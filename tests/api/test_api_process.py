"""The API process on its own: it serves every route without importing torch, and guards webhook targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.fixtures.stack import TEST_WEBHOOK_SECRET

# Runs the real app under uvicorn inside a fresh interpreter, exercises it over HTTP, then reports which
# heavy modules that interpreter ever imported.
SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import httpx, uvicorn
    from devtools.net import free_port
    from api.main import create_app
    from services.settings import Settings

    port = free_port()
    config = uvicorn.Config(create_app(Settings()), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(base + "/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    out = {}
    with httpx.Client(base_url=base, timeout=10) as client:
        created = client.post("/v1/generations", json={"prompt": "a fox", "width": 512, "height": 512})
        job_id = created.json()["id"]
        out["created"] = created.status_code
        out["get"] = client.get(f"/v1/generations/{job_id}").status_code
        out["cancel"] = client.post(f"/v1/generations/{job_id}/cancel").status_code
        with client.stream("GET", f"/v1/generations/{job_id}/events") as events:
            out["events"] = events.status_code
            body = "".join(events.iter_text())
            out["events_body"] = [line for line in body.splitlines() if line.startswith("event:")]
        out["ready"] = client.get("/readyz").status_code
        out["metrics"] = client.get("/metrics").status_code
        out["openapi"] = client.get("/openapi.json").status_code
        private = client.post(
            "/v1/generations",
            json={"prompt": "a fox", "webhook_url": "http://127.0.0.1:9/hook"},
        )
        out["private_webhook"] = [private.status_code, private.json()]
        metadata = client.post(
            "/v1/generations",
            json={"prompt": "a fox", "webhook_url": "http://169.254.169.254/latest/meta-data"},
        )
        out["metadata_webhook"] = metadata.status_code
    server.should_exit = True
    thread.join(timeout=10)
    heavy = sorted(m for m in ("torch", "diffusers", "transformers", "worker") if m in sys.modules)
    out["heavy_modules"] = heavy
    print(json.dumps(out))
    """
)


def test_the_api_never_imports_torch_and_refuses_private_webhooks(redis_url: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DARKROOM_REDIS_URL": redis_url,
        "DARKROOM_STORAGE_URL": f"file://{tmp_path / 'out'}",
        "DARKROOM_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
        "DARKROOM_WEBHOOK_ALLOW_PRIVATE": "false",
        "DARKROOM_WEBHOOK_ALLOW_HTTP": "true",
        "DARKROOM_AUTH_DISABLED": "true",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["heavy_modules"] == []
    assert (out["created"], out["get"], out["cancel"], out["events"]) == (202, 200, 200, 200)
    assert out["events_body"] == ["event: status", "event: status", "event: job"]
    assert (out["ready"], out["metrics"], out["openapi"]) == (200, 200, 200)
    status, problem = out["private_webhook"]
    assert status == 422 and problem["code"] == "webhook_url_not_allowed"
    assert problem["errors"][0]["field"] == "webhook_url"
    assert out["metadata_webhook"] == 422
