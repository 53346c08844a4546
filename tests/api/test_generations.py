"""The product end to end: real Redis, the API under uvicorn, a warm tiny-model worker, file storage.

Every test talks HTTP to the running stack; jobs are small (512², a few steps) so the module stays fast.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from standardwebhooks.webhooks import Webhook

from schemas.jobs import CreateGeneration
from tests.api.spec_schemas import stream_event_errors
from tests.fixtures.http_receiver import HttpReceiver
from tests.fixtures.stack import TEST_WEBHOOK_SECRET, Stack, api_stack

SMALL: dict[str, Any] = {
    "prompt": "a red fox in the snow",
    "width": 512,
    "height": 512,
    "num_inference_steps": 4,
}
SLOW: dict[str, Any] = {**SMALL, "num_inference_steps": 100}  # long enough to be caught queued or running


def submit(stack: Stack, body: dict[str, Any], **headers: str) -> httpx.Response:
    with stack.client() as client:
        return client.post("/v1/generations", json=body, headers=headers)


def download(url: str) -> bytes:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return response.content


def test_full_lifecycle_with_queue_position_progress_and_reproducible_bytes(file_stack: Stack) -> None:
    first = submit(file_stack, {**SLOW, "seed": 1})
    assert first.status_code == 202
    assert first.headers["location"] == f"/v1/generations/{first.json()['id']}"
    second = submit(file_stack, {**SMALL, "seed": 42})
    assert second.status_code == 202
    second_id = second.json()["id"]
    assert second.json()["status"] == "queued"
    assert second.json()["queue_position"] == 1
    assert second.json()["request"]["seed"] == 42

    running = file_stack.wait_for(first.json()["id"], {"running"}, timeout=180)
    assert running["started_at"] is not None
    with file_stack.client() as client:
        deadline = time.monotonic() + 60
        while (job := client.get(f"/v1/generations/{first.json()['id']}").json())["progress"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert job["progress"]["total"] == 100 and job["progress"]["step"] >= 1
    # Seen running with progress: the rest of its 100 steps would prove nothing more (cancel has tests of
    # its own), so stop it at the next step and let the queued job have the worker.
    with file_stack.client() as client:
        assert client.post(f"/v1/generations/{first.json()['id']}/cancel").status_code == 202
    file_stack.wait_for(first.json()["id"], {"canceled"}, timeout=60)

    done = file_stack.wait_for(second_id, {"succeeded"}, timeout=120)
    assert done["queue_position"] is None and done["completed_at"] is not None
    [image] = done["images"]
    data = download(image["url"])
    assert hashlib.sha256(data).hexdigest() == image["sha256"]
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.size == (512, 512) == (image["width"], image["height"])
    assert (image["seed"], image["content_type"]) == (42, "image/png")

    again = submit(file_stack, {**SMALL, "seed": 42})
    replay = file_stack.wait_for(again.json()["id"], {"succeeded"})
    assert replay["images"][0]["sha256"] == image["sha256"]
    assert download(replay["images"][0]["url"]) == data


def test_urls_are_signed_fresh_on_every_read_and_tampering_is_refused(file_stack: Stack) -> None:
    job_id = submit(file_stack, {**SMALL, "seed": 5}).json()["id"]
    job = file_stack.wait_for(job_id, {"succeeded"})
    url = job["images"][0]["url"]
    assert "signature=" in url and "expires=" in url
    time.sleep(1.1)  # expiry has one-second resolution
    with file_stack.client() as client:
        again = client.get(f"/v1/generations/{job_id}").json()
    assert again["images"][0]["url"] != url
    tampered = url.replace("signature=", "signature=0")
    assert httpx.get(tampered, timeout=10).status_code == 404
    unsigned = url.split("?")[0]
    assert httpx.get(unsigned, timeout=10).status_code == 404


def test_an_unknown_id_is_404_problem_json(file_stack: Stack) -> None:
    with file_stack.client() as client:
        for path in ("/v1/generations/gen_nope", "/v1/generations/gen_nope/events"):
            response = client.get(path)
            assert response.status_code == 404
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["code"] == "not_found"
        assert client.post("/v1/generations/gen_nope/cancel").status_code == 404


def test_prefer_wait_returns_the_finished_job(file_stack: Stack) -> None:
    response = submit(file_stack, {**SMALL, "seed": 9}, Prefer="wait=30")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert response.headers["preference-applied"] == "wait=30"
    assert len(response.json()["images"]) == 1


def _read_sse(url: str, headers: dict[str, str] | None = None) -> list[tuple[str, Any, str | None]]:
    """Every (event, data, id) of a stream, read until the server closes it."""
    events: list[tuple[str, Any, str | None]] = []
    with httpx.stream("GET", url, timeout=60, headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name, event_id = None, None
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = line[len("id: ") :]
            elif line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: ") and name:
                events.append((name, json.loads(line[len("data: ") :]), event_id))
    return events


def test_sse_streams_progress_and_the_final_job(file_stack: Stack) -> None:
    job_id = submit(file_stack, {**SMALL, "seed": 3, "num_inference_steps": 6}).json()["id"]
    url = f"{file_stack.api_url}/v1/generations/{job_id}/events"
    events = [(name, data) for name, data, _ in _read_sse(url)]
    names = [name for name, _ in events]
    assert names[0] == "status" and events[0][1]["status"] == "queued"
    assert ("status", "running") in [(n, d.get("status")) for n, d in events]
    progress = [data for name, data in events if name == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 7))
    assert names[-1] == "job" and events[-1][1]["status"] == "succeeded"
    assert events[-1][1]["images"][0]["url"]
    # Every frame is what the spec's GenerationStreamEvent says it is.
    for name, data, event_id in _read_sse(url):
        assert stream_event_errors(name, event_id, json.dumps(data)) == [], (name, data)


def test_sse_of_a_finished_job_replays_and_closes_even_after_the_last_event(file_stack: Stack) -> None:
    job_id = submit(file_stack, {**SMALL, "seed": 4}).json()["id"]
    file_stack.wait_for(job_id, {"succeeded"})
    url = f"{file_stack.api_url}/v1/generations/{job_id}/events"
    started = time.monotonic()
    everything = _read_sse(url)
    assert [n for n, _, _ in everything][-2:] == ["status", "job"]
    assert everything[-1][1]["status"] == "succeeded"
    # A client that saw the final status and reconnects (Last-Event-ID: that status) gets the job, then EOF.
    final_status_id = everything[-2][2]
    assert final_status_id is not None
    again = _read_sse(url, {"Last-Event-ID": final_status_id})
    assert [(n, d["status"]) for n, d, _ in again] == [("job", "succeeded")]
    assert time.monotonic() - started < 10  # no waiting for events that will never come


def test_cancel_queued_running_and_finished_jobs(file_stack: Stack) -> None:
    running_id = submit(file_stack, {**SLOW, "seed": 11}).json()["id"]
    queued_id = submit(file_stack, {**SLOW, "seed": 12}).json()["id"]
    file_stack.wait_for(running_id, {"running"})
    with file_stack.client() as client:
        canceled = client.post(f"/v1/generations/{queued_id}/cancel")
        assert canceled.status_code == 200
        assert canceled.json()["status"] == "canceled"
        assert canceled.json()["error"]["type"] == "canceled"

        interrupting = client.post(f"/v1/generations/{running_id}/cancel")
        assert interrupting.status_code == 202
        stopped = file_stack.wait_for(running_id, {"canceled", "succeeded", "failed"}, timeout=30)
        assert stopped["status"] == "canceled"
        assert stopped["progress"]["step"] < 100
        assert stopped["images"] == []

        again = client.post(f"/v1/generations/{queued_id}/cancel")
        assert again.status_code == 409
        assert again.json()["code"] == "job_already_finished"
    assert file_stack.wait_for(queued_id, {"canceled"})["started_at"] is None


def test_idempotency_key_same_body_same_job_different_body_422(file_stack: Stack) -> None:
    key = "order-7781"
    first = submit(file_stack, {**SMALL, "seed": 70}, **{"Idempotency-Key": key})
    second = submit(file_stack, {**SMALL, "seed": 70}, **{"Idempotency-Key": key})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    other = submit(file_stack, {**SMALL, "seed": 71}, **{"Idempotency-Key": key})
    assert other.status_code == 422
    assert other.json()["code"] == "idempotency_key_reused"
    without_seed = submit(file_stack, SMALL, **{"Idempotency-Key": "no-seed"})
    replay = submit(file_stack, SMALL, **{"Idempotency-Key": "no-seed"})
    assert without_seed.json()["id"] == replay.json()["id"]
    assert without_seed.json()["request"]["seed"] == replay.json()["request"]["seed"]


def test_idempotency_compares_requests_with_their_defaults_filled_in(file_stack: Stack) -> None:
    """A generated client spells out every default, curl sends the prompt: the same request, so one
    Idempotency-Key names one job either way. A seed the server would draw is not a seed the client named."""
    terse = {**SMALL, "num_inference_steps": 1}
    spelled_out = CreateGeneration.model_validate(terse).model_dump(mode="json")
    assert spelled_out["guidance_scale"] == 4.5 and spelled_out["webhook_events"] == [
        "generation.succeeded",
        "generation.failed",
        "generation.canceled",
    ]
    first = submit(file_stack, terse, **{"Idempotency-Key": "defaults-1"})
    assert first.status_code == 202, first.text
    for body in (spelled_out, {k: v for k, v in spelled_out.items() if v is not None}):
        replay = submit(file_stack, body, **{"Idempotency-Key": "defaults-1"})
        assert replay.status_code == 202, replay.text
        assert replay.json()["id"] == first.json()["id"]
    seeded = {**terse, "seed": first.json()["request"]["seed"]}  # the seed the server drew is still another
    for body in ({**terse, "guidance_scale": 5.0}, seeded):
        other = submit(file_stack, body, **{"Idempotency-Key": "defaults-1"})
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    file_stack.wait_for(first.json()["id"], {"succeeded"})


def test_inpainting_through_the_stack_stores_the_mask_beside_the_init_image(file_stack: Stack) -> None:
    def encoded(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (256, 0, 512, 512))  # repaint the right half
    body = {
        **SMALL,
        "seed": 9,
        "init_image": encoded(Image.new("RGB", (512, 512), (30, 120, 200))),
        "mask_image": encoded(mask),
        "strength": 0.5,
    }
    # The storage is the shared backend's: other modules' jobs store masks there too.
    root = Path(file_stack.env["DARKROOM_STORAGE_URL"].removeprefix("file://"))
    masks_before = set(root.rglob("mask.png"))
    created = submit(file_stack, body, **{"Idempotency-Key": "inpaint-1"})
    assert created.status_code == 202, created.text
    job = file_stack.wait_for(created.json()["id"], {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded", job
    assert (job["images"][0]["width"], job["images"][0]["height"]) == (512, 512)
    assert job["progress"] == {"step": 2, "total": 2}  # strength 0.5 of 4 steps
    assert job["request"].get("mask_image") is None and job["request"].get("init_image") is None
    assert body["mask_image"] not in json.dumps(job)
    assert download(job["mask_image_url"]) == base64.b64decode(body["mask_image"])
    assert "/mask.png" in job["mask_image_url"] and "/init.png" in job["init_image_url"]
    with Image.open(io.BytesIO(download(job["images"][0]["url"]))) as png:
        recorded = json.loads(png.text["darkroom"])["request"]
    # The hash of the mask file itself: what was sent, and what mask_image_url serves.
    assert recorded["mask_image_sha256"] == hashlib.sha256(download(job["mask_image_url"])).hexdigest()

    # A replay is answered with the first job; the images it uploaded on the way are deleted again.
    replay = submit(file_stack, body, **{"Idempotency-Key": "inpaint-1"})
    assert replay.json()["id"] == job["id"]
    assert [path.parent.name for path in set(root.rglob("mask.png")) - masks_before] == [job["id"]]


def test_outpainting_grows_the_canvas_and_stores_the_mask_the_server_drew(file_stack: Stack) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (512, 384), (30, 120, 200)).save(buffer, format="PNG")
    outpaint = {"left": 128, "right": 128, "top": 64, "bottom": 64}
    unsized = {key: value for key, value in SMALL.items() if key not in ("width", "height")}
    body = {
        **unsized,
        "seed": 11,
        "init_image": base64.b64encode(buffer.getvalue()).decode(),
        "outpaint": outpaint,
    }
    created = submit(file_stack, body)
    assert created.status_code == 202, created.text
    job = file_stack.wait_for(created.json()["id"], {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded", job
    assert (job["request"]["width"], job["request"]["height"]) == (768, 512)  # the grown canvas
    assert job["request"]["strength"] == 1.0 and job["request"]["outpaint"]["feather"] == 16
    assert (job["images"][0]["width"], job["images"][0]["height"]) == (768, 512)
    with Image.open(io.BytesIO(download(job["mask_image_url"]))) as mask:
        assert mask.size == (768, 512)
        assert mask.getpixel((10, 10)) == 255 and mask.getpixel((384, 256)) == 0  # border / image
    with Image.open(io.BytesIO(download(job["init_image_url"]))) as canvas:
        assert canvas.size == (768, 512) and canvas.convert("RGB").getpixel((5, 5)) == (30, 120, 200)

    refused = submit(file_stack, {**SMALL, "outpaint": outpaint})
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "outpaint"


def test_webhook_retried_until_delivered_and_verified_independently(
    file_stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    webhook_receiver.script([500, 500, 200])
    body = {**SMALL, "seed": 21, "webhook_url": webhook_receiver.url + "/hooks/darkroom"}
    job_id = submit(file_stack, body).json()["id"]
    requests = webhook_receiver.wait_for(3, timeout=60)
    verifier = Webhook(TEST_WEBHOOK_SECRET)
    payloads = [verifier.verify(r.body, dict(r.headers)) for r in requests]
    assert len({r.headers["webhook-id"] for r in requests}) == 1
    assert all(p["type"] == "generation.succeeded" for p in payloads)
    assert payloads[-1]["data"]["id"] == job_id and payloads[-1]["data"]["status"] == "succeeded"
    deadline = time.monotonic() + 20
    with file_stack.client() as client:
        while True:
            [delivery] = client.get(f"/v1/generations/{job_id}").json()["webhook"]["deliveries"]
            if delivery["state"] == "delivered" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert delivery["state"] == "delivered"
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]
    assert delivery["event"] == "generation.succeeded"


def _looks_pickled(value: bytes) -> bool:
    """A pickle of protocol 2+ starts with PROTO (0x80) and its version; RQ's own pickles are protocol 4/5."""
    return len(value) > 2 and value[0] == 0x80 and 2 <= value[1] <= 5


def _stored_values(connection: Any, key: bytes) -> list[bytes]:
    kind = connection.type(key)
    if kind == b"string":
        return [connection.get(key)]
    if kind == b"hash":
        values = list(connection.hgetall(key).values())
        # RQ keeps call data, results and exception text zlib-compressed: look inside too.
        return values + [zlib.decompress(v) for v in values if v[:1] == b"x" and _inflates(v)]
    if kind == b"list":
        return list(connection.lrange(key, 0, -1))
    if kind == b"set":
        return list(connection.smembers(key))
    if kind == b"zset":
        return [member for member, _ in connection.zrange(key, 0, -1, withscores=True)]
    if kind == b"stream":
        return [v for _, fields in connection.xrange(key) for v in fields.values()]
    return []


def _inflates(value: bytes) -> bool:
    try:
        zlib.decompress(value)
    except zlib.error:
        return False
    return True


def test_nothing_in_redis_is_a_pickle_after_a_job_with_a_webhook(
    file_stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    body = {**SMALL, "seed": 22, "webhook_url": webhook_receiver.url + "/hooks/pickle-check"}
    job_id = submit(file_stack, body).json()["id"]
    file_stack.wait_for(job_id, {"succeeded"})
    webhook_receiver.wait_for(1, timeout=60)
    with file_stack.redis() as connection:
        keys = list(connection.scan_iter(count=1000))
        assert any(job_id.encode() in key for key in keys)
        pickled = [key for key in keys if any(_looks_pickled(v) for v in _stored_values(connection, key))]
    assert not pickled, pickled


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"width": 512, "height": 512}, "prompt"),
        ({"prompt": "x", "width": 500, "height": 512}, "width"),
        ({"prompt": "x", "width": 4096, "height": 4096}, "width"),
        ({"prompt": "x", "aspect_ratio": "1:1", "width": 1024, "height": 1024}, "aspect_ratio"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "webhook_url": "ftp://example.com/hook"}, "webhook_url"),
    ],
)
def test_invalid_requests_are_422_problem_json_naming_the_field(
    file_stack: Stack, body: dict[str, Any], field: str
) -> None:
    response = submit(file_stack, body)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == 422 and problem["type"].endswith(problem["code"])
    assert field in [error["field"] for error in problem["errors"]]


def test_malformed_json_is_a_problem_not_a_crash(file_stack: Stack) -> None:
    with file_stack.client() as client:
        response = client.post(
            "/v1/generations", content=b'{"prompt": "x", ', headers={"content-type": "application/json"}
        )
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")


def test_health_ready_and_metrics(file_stack: Stack) -> None:
    with file_stack.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        text = client.get("/metrics").text
    assert "darkroom_generation_submissions_total" in text
    assert 'darkroom_http_requests_total{method="POST",route="/v1/generations"' in text
    assert "gen_" not in text  # routes are labelled by template, never by job id


def test_concurrent_submissions_all_finish(file_stack: Stack) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def post(seed: int) -> None:
        job_id = submit(file_stack, {**SMALL, "seed": seed, "num_inference_steps": 2}).json()["id"]
        with lock:
            ids.append(job_id)

    threads = [threading.Thread(target=post, args=(seed,)) for seed in range(200, 208)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(set(ids)) == 8
    for job_id in ids:
        assert file_stack.wait_for(job_id, {"succeeded"}, timeout=60)["status"] == "succeeded"


def test_file_urls_follow_the_request_when_no_public_url_is_set(
    shared_backend: Stack, tmp_path: Path
) -> None:
    """Issue 15: with ``DARKROOM_PUBLIC_URL`` unset, download URLs start at the URL the request reached the
    API at (its port, or a Host header), not at a fixed 127.0.0.1:8000."""
    with contextlib.contextmanager(api_stack)(shared_backend, tmp_path, {"DARKROOM_PUBLIC_URL": ""}) as stack:
        assert not stack.api_url.endswith(":8000")
        job = submit(stack, {**SMALL, "seed": 3}, Prefer="wait=60").json()
        assert job["status"] == "succeeded", job
        url = job["images"][0]["url"]
        assert url.startswith(f"{stack.api_url}/v1/files/"), url
        assert hashlib.sha256(download(url)).hexdigest() == job["images"][0]["sha256"]
        with stack.client() as client:
            seen_as = client.get(f"/v1/generations/{job['id']}", headers={"Host": "darkroom.example:8443"})
        assert seen_as.json()["images"][0]["url"].startswith("http://darkroom.example:8443/v1/files/")


def test_the_api_log_has_no_probe_lines_and_no_colour_codes(file_stack: Stack) -> None:
    """Issue 15: the stack polled /readyz until the API was ready, and tests scrape /metrics: none of those
    successful probes is an access line at INFO, and uvicorn's ``color_message`` is not copied in."""
    with file_stack.client() as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/generations/gen_nope").status_code == 404  # an ordinary request is logged
    log = file_stack.logs("api")
    assert "color_message" not in log and "\x1b[" not in log
    assert "/v1/generations/gen_nope" in log
    for path in ("/readyz", "/healthz", "/metrics"):
        assert path not in log, path
