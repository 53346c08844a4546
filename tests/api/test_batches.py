"""Batches end to end: real Redis, the API under uvicorn, a warm tiny-model worker, a real webhook receiver.

Items are small (512², a few steps). The checks that need no GPU worker (auth, limits, validation) run
against an API served alone on the test Redis, so they cost no generation time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from standardwebhooks.webhooks import Webhook

from api.main import create_app
from schemas.batches import CreateBatch
from services.api_keys import hash_key, new_key
from services.settings import DEFAULT_MODEL, Settings
from tests.api import serve
from tests.fixtures.http_receiver import HttpReceiver
from tests.fixtures.stack import TEST_WEBHOOK_SECRET, Stack

ITEM: dict[str, Any] = {"prompt": "a lighthouse", "width": 512, "height": 512, "num_inference_steps": 1}


def post_batch(stack: Stack, body: dict[str, Any], **headers: str) -> httpx.Response:
    with stack.client() as client:
        return client.post("/v1/batches", json=body, headers=headers)


def read_batch(stack: Stack, batch_id: str, **params: int) -> dict[str, Any]:
    with stack.client() as client:
        response = client.get(f"/v1/batches/{batch_id}", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_for_batch(stack: Stack, batch_id: str, statuses: set[str], timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (batch := read_batch(stack, batch_id))["status"] not in statuses:
        assert time.monotonic() < deadline, (
            f"batch still {batch['status']} after {timeout}s: {batch['counts']}"
        )
        time.sleep(0.05)
    return batch


def wait_delivered(stack: Stack, batch_id: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        deliveries: list[dict[str, Any]] = read_batch(stack, batch_id)["webhook"]["deliveries"]
        if deliveries and all(d["state"] == "delivered" for d in deliveries):
            return deliveries
        assert time.monotonic() < deadline, deliveries
        time.sleep(0.05)


def batch_events(receiver: HttpReceiver) -> list[dict[str, Any]]:
    verifier = Webhook(TEST_WEBHOOK_SECRET)
    return [verifier.verify(r.body, dict(r.headers)) for r in receiver.requests]


def test_a_batch_completes_with_item_states_and_exactly_one_batch_completed_webhook(
    file_stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    body = {
        "requests": [{**ITEM, "seed": seed} for seed in (1, 2, 3)] + [{**ITEM, "width": 576, "seed": 4}],
        "webhook_url": webhook_receiver.url,
        "webhook_events": ["batch.completed", "generation.completed"],
    }
    response = post_batch(file_stack, body)
    assert response.status_code == 202, response.text
    created = response.json()
    batch_id = created["id"]
    assert response.headers["location"] == f"/v1/batches/{batch_id}"
    assert created["counts"]["total"] == 4 and len(created["items"]) == 4
    assert created["status"] in {"queued", "running"}

    done = wait_for_batch(file_stack, batch_id, {"completed", "canceled"})
    assert done["status"] == "completed" and done["completed_at"] is not None
    assert done["counts"] == {
        "total": 4,
        "queued": 0,
        "running": 0,
        "succeeded": 4,
        "failed": 0,
        "canceled": 0,
    }
    assert [item["status"] for item in done["items"]] == ["succeeded"] * 4
    assert [item["images"][0]["seed"] for item in done["items"]] == [1, 2, 3, 4]
    assert httpx.get(done["items"][3]["images"][0]["url"], timeout=10).status_code == 200
    with file_stack.client() as client:
        item = client.get(f"/v1/generations/{done['items'][0]['id']}").json()
    assert item["batch_id"] == batch_id and item["status"] == "succeeded"

    [delivery] = wait_delivered(file_stack, batch_id)
    assert delivery["event"] == "batch.completed"
    webhook_receiver.wait_for(5, timeout=20)  # four generation.succeeded, one batch.completed
    events = batch_events(webhook_receiver)
    completed = [e for e in events if e["type"] == "batch.completed"]
    assert len(completed) == 1, [e["type"] for e in events]
    assert completed[0]["data"]["id"] == batch_id and completed[0]["data"]["counts"]["succeeded"] == 4
    assert "items" not in completed[0]["data"]
    item_events = sorted(e["data"]["id"] for e in events if e["type"] == "generation.succeeded")
    assert item_events == sorted(i["id"] for i in done["items"])

    page = read_batch(file_stack, batch_id, offset=1, limit=2)
    assert [i["id"] for i in page["items"]] == [i["id"] for i in done["items"][1:3]]
    assert page["next_offset"] == 3 and read_batch(file_stack, batch_id, offset=3)["next_offset"] is None


def _started(stack: Stack, job_id: str) -> datetime:
    with stack.client() as client:
        job = client.get(f"/v1/generations/{job_id}").json()
    return datetime.fromisoformat(job["started_at"])


def test_an_interactive_job_runs_before_the_batch_items_still_waiting(file_stack: Stack) -> None:
    batch = post_batch(file_stack, {"template": ITEM, "count": 6}).json()  # coalesced: a call of 4, then 2
    with file_stack.client() as client:
        job_id = client.post("/v1/generations", json={**ITEM, "seed": 5}).json()["id"]
    waiting = [
        i["id"] for i in read_batch(file_stack, batch["id"], limit=1000)["items"] if i["status"] == "queued"
    ]
    assert waiting, "the batch ran out before the interactive job was submitted; make its items slower"
    file_stack.wait_for(job_id, {"succeeded"}, timeout=90)
    wait_for_batch(file_stack, batch["id"], {"completed"})
    interactive_start = _started(file_stack, job_id)
    assert all(interactive_start < _started(file_stack, item) for item in waiting)


def test_cancel_ends_queued_items_at_once_and_running_ones_at_their_next_step(
    file_stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    body = {
        "template": {**ITEM, "num_inference_steps": 50},
        "seeds": list(range(6)),
        "webhook_url": webhook_receiver.url,
    }
    batch_id = post_batch(file_stack, body).json()["id"]
    deadline = time.monotonic() + 60
    while read_batch(file_stack, batch_id)["counts"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with file_stack.client() as client:
        response = client.post(f"/v1/batches/{batch_id}/cancel")
        assert response.status_code in (200, 202), response.text
        assert response.json()["cancel_requested"] is True
        assert response.json()["counts"]["queued"] == 0
        done = wait_for_batch(file_stack, batch_id, {"completed", "canceled"}, timeout=60)
        assert done["status"] == "canceled"
        assert done["counts"]["canceled"] == 6 - done["counts"]["succeeded"] >= 2
        again = client.post(f"/v1/batches/{batch_id}/cancel")
        assert again.status_code == 409 and again.json()["code"] == "batch_already_finished"
        assert again.headers["content-type"].startswith("application/problem+json")
    [delivery] = wait_delivered(file_stack, batch_id)
    [event] = batch_events(webhook_receiver)
    assert event["type"] == "batch.completed" and event["data"]["status"] == "canceled"
    assert delivery["msg_id"] == webhook_receiver.requests[0].headers["webhook-id"]


def test_idempotency_key_same_body_same_batch_other_body_422(file_stack: Stack) -> None:
    body = {"template": {**ITEM, "seed": 9}, "count": 2}
    first = post_batch(file_stack, body, **{"Idempotency-Key": "nightly-42"})
    second = post_batch(file_stack, body, **{"Idempotency-Key": "nightly-42"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert [i["id"] for i in first.json()["items"]] == [i["id"] for i in second.json()["items"]]
    other = post_batch(file_stack, {**body, "count": 3}, **{"Idempotency-Key": "nightly-42"})
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    with file_stack.client() as client:  # no need to run it: what matters is that nothing was duplicated
        client.post(f"/v1/batches/{first.json()['id']}/cancel")
    assert read_batch(file_stack, first.json()["id"])["counts"]["total"] == 2


def test_idempotency_compares_batches_with_their_defaults_filled_in(file_stack: Stack) -> None:
    """As for single jobs: a batch with every default spelled out (a generated client's) and the same
    batch written tersely are one request under one Idempotency-Key; another count is not."""
    terse = {"template": ITEM, "count": 2}
    spelled_out = CreateBatch.model_validate(terse).model_dump(mode="json")
    assert spelled_out["webhook_events"] == ["batch.completed"]
    assert spelled_out["template"]["guidance_scale"] == 4.5
    first = post_batch(file_stack, terse, **{"Idempotency-Key": "defaults-batch"})
    assert first.status_code == 202, first.text
    replay = post_batch(file_stack, spelled_out, **{"Idempotency-Key": "defaults-batch"})
    assert replay.status_code == 202, replay.text
    assert replay.json()["id"] == first.json()["id"]
    other = post_batch(file_stack, {**spelled_out, "count": 3}, **{"Idempotency-Key": "defaults-batch"})
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    with file_stack.client() as client:
        client.post(f"/v1/batches/{first.json()['id']}/cancel")
    assert read_batch(file_stack, first.json()["id"])["counts"]["total"] == 2


# --- without a worker: ownership, limits, validation --------------------------------------------------------

ALICE, BOB = new_key(), new_key()


@pytest.fixture
def api(redis_url: str, tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path}",
        api_keys=f"alice:sha256:{hash_key(ALICE)},bob:sha256:{hash_key(BOB)}",
        max_batch_queue_depth=5,
        queue_share_per_key=1,
        prompt_blocklist="forbidden",
    )
    with serve(create_app(settings), lifespan="on") as url:
        yield url


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_another_keys_batch_is_404_and_its_items_too(api: str) -> None:
    with _client(api, ALICE) as alice, _client(api, BOB) as bob:
        batch = alice.post("/v1/batches", json={"template": ITEM, "count": 2}).json()
        item_id = batch["items"][0]["id"]
        assert alice.get(f"/v1/batches/{batch['id']}").status_code == 200
        assert alice.get(f"/v1/generations/{item_id}").json()["queue_position"] is not None
        for response in (
            bob.get(f"/v1/batches/{batch['id']}"),
            bob.post(f"/v1/batches/{batch['id']}/cancel"),
            bob.get(f"/v1/generations/{item_id}"),
            bob.get("/v1/batches/batch_nope"),
        ):
            assert response.status_code == 404
            assert response.headers["content-type"].startswith("application/problem+json")
        canceled = alice.post(f"/v1/batches/{batch['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert canceled.json()["counts"]["canceled"] == 2


def test_a_batch_is_admitted_whole_or_not_at_all(api: str, redis_url: str) -> None:
    connection = redis_lib.Redis.from_url(redis_url)
    with _client(api, ALICE) as alice:
        assert alice.post("/v1/batches", json={"template": ITEM, "count": 4}).status_code == 202
        full = alice.post("/v1/batches", json={"template": ITEM, "count": 2})
        assert full.status_code == 503 and full.json()["code"] == "queue_full"
        assert "retry-after" in full.headers
        assert connection.llen(f"rq:queue:darkroom-batch:{DEFAULT_MODEL}") == 4  # the default model's
        assert connection.llen(f"rq:queue:darkroom:{DEFAULT_MODEL}") == 0  # interactive jobs: their own
        assert alice.post("/v1/batches", json={"template": ITEM, "count": 1}).status_code == 202
    connection.close()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"requests": [ITEM] * 1001}, "requests"),
        ({"requests": [ITEM, {**ITEM, "width": 500}]}, "requests.1.width"),
        ({"requests": []}, "requests"),
        ({"template": ITEM}, "count"),
        ({"template": ITEM, "count": 1001}, "count"),
        ({"template": ITEM, "seeds": [1, -1]}, "seeds.1"),
        ({"template": {**ITEM, "seed": 3}, "seeds": [1]}, "seeds"),
        ({"requests": [ITEM], "template": ITEM, "count": 2}, "template"),
        ({"requests": [ITEM], "webhook_url": "ftp://example.com/hook"}, "webhook_url"),
        ({"requests": [ITEM], "webhook_events": ["batch.completed", "batch.started"]}, "webhook_events.1"),
        ({"requests": [ITEM], "prompt": "x"}, "prompt"),
        ({"requests": [ITEM, {**ITEM, "prompt": "a Forbidden fox"}]}, "requests.1.prompt"),  # content filter
        ({"template": {**ITEM, "prompt": "forbidden"}, "count": 2}, "template.prompt"),
    ],
)
def test_bad_batches_are_422_problems_naming_the_field(api: str, body: dict[str, Any], field: str) -> None:
    with _client(api, ALICE) as alice:
        response = alice.post("/v1/batches", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert field in [error["field"] for error in response.json()["errors"]]


def test_a_key_lists_its_own_batches_newest_first_page_by_page(api: str, redis_url: str) -> None:
    with _client(api, ALICE) as alice, _client(api, BOB) as bob:
        mine = [alice.post("/v1/batches", json={"template": ITEM, "count": 1}).json()["id"] for _ in range(3)]
        theirs = bob.post("/v1/batches", json={"template": ITEM, "count": 1}).json()["id"]
        first = alice.get("/v1/batches", params={"limit": 2})
        assert first.status_code == 200, first.text
        assert first.json()["object"] == "list"
        assert [b["id"] for b in first.json()["data"]] == [mine[2], mine[1]]
        assert first.json()["next_offset"] == 2
        listed = first.json()["data"][0]
        assert listed["counts"]["total"] == 1 and listed["status"] == "queued" and listed["items"] is None
        rest = alice.get("/v1/batches", params={"offset": 2, "limit": 2}).json()
        assert [b["id"] for b in rest["data"]] == [mine[0]] and rest["next_offset"] is None
        assert [b["id"] for b in bob.get("/v1/batches").json()["data"]] == [theirs]

        # A batch whose record expired (retention) drops out of the list, and out of the index.
        connection = redis_lib.Redis.from_url(redis_url)
        connection.delete(f"darkroom:batch:{mine[1]}")
        assert [b["id"] for b in alice.get("/v1/batches").json()["data"]] == [mine[2], mine[0]]
        assert connection.zcard("darkroom:batches-of:alice") == 2

        for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}):
            refused = alice.get("/v1/batches", params=bad)
            assert refused.status_code == 422 and refused.json()["code"] == "validation_error", bad
