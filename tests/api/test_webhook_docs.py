"""The spec's ``webhooks`` section is the contract real deliveries keep.

A real receiver subscribes to every event of the vocabulary — for single jobs and for a batch — on the
shared backend (Redis, a tiny-model worker, the webhook worker). Each delivery must verify with the
Standard Webhooks reference library, carry a subscribed ``type``, and validate against that event's schema
in the committed ``docs/openapi.json``, with no property the schema does not document.

The failure is cheap and real: this API offers a LoRA (``ghost``) the shared worker does not have, so the
worker fails the job ``lora_unavailable`` before any step.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from standardwebhooks.webhooks import Webhook

from api.openapi import DEFAULT_PATH
from schemas.webhooks import WebhookEvent
from tests.fixtures.http_receiver import HttpReceiver
from tests.fixtures.stack import TEST_WEBHOOK_SECRET, Stack, api_stack

SMALL: dict[str, Any] = {"width": 512, "height": 512, "num_inference_steps": 2, "guidance_scale": 1.0}
GENERATION = [event.value for event in WebhookEvent if event is not WebhookEvent.BATCH_COMPLETED]
SPEC_URI = "urn:darkroom:openapi"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, shared_backend: Stack) -> Iterator[Stack]:
    env = {"DARKROOM_LORAS": json.dumps({"ghost": "/nonexistent/ghost.safetensors"})}
    yield from api_stack(shared_backend, tmp_path_factory.mktemp("stack-webhook-docs"), env)


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return json.loads(DEFAULT_PATH.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def closed(schema: Any) -> Any:
    """``schema`` with ``unevaluatedProperties: false`` on every object that lists its properties and
    allows no others: a payload property the spec does not document then fails validation."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["unevaluatedProperties"] = False
    elif isinstance(schema, list):
        schema = [closed(value) for value in schema]
    return schema


def payload_validator(spec: dict[str, Any], event: str) -> Draft202012Validator:
    """A validator for ``event``'s request body, its ``$ref``s resolved inside the spec."""
    resource = Resource.from_contents(closed(copy.deepcopy(spec)), default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(SPEC_URI, resource)
    pointer = f"/webhooks/{event}/post/requestBody/content/application~1json/schema"
    return Draft202012Validator(
        {"$ref": f"{SPEC_URI}#{pointer}"},
        registry=registry,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


def submit(stack: Stack, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with stack.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def wait_all_delivered(stack: Stack, paths: list[str], timeout: float = 60.0) -> None:
    """Until every delivery listed on these jobs and batches has been delivered (none pending)."""
    deadline = time.monotonic() + timeout
    with stack.client() as client:
        for path in paths:
            while True:
                deliveries = client.get(path).json()["webhook"]["deliveries"]
                if deliveries and all(d["state"] == "delivered" for d in deliveries):
                    break
                assert time.monotonic() < deadline, (path, deliveries)
                time.sleep(0.05)


def test_the_spec_documents_one_webhook_per_event(spec: dict[str, Any]) -> None:
    webhooks = spec["webhooks"]
    assert set(webhooks) == {event.value for event in WebhookEvent}
    ids = [item["post"]["operationId"] for item in webhooks.values()]
    assert len(set(ids)) == len(ids)
    for name, item in webhooks.items():
        operation = item["post"]
        assert operation["summary"] and operation["tags"] == ["webhooks"] and operation["security"] == []
        headers = {p["name"]: p for p in operation["parameters"] if p["in"] == "header"}
        assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
        assert all(header["required"] and header["description"] for header in headers.values())
        assert {"200", "410", "4XX", "5XX"} <= set(operation["responses"]), name
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        model = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        assert model["properties"]["type"]["const"] == name


def test_a_single_job_cannot_subscribe_to_batch_completed(stack: Stack) -> None:
    events = ["generation.started", "batch.completed"]
    body = {**SMALL, "prompt": "x", "webhook_url": "http://127.0.0.1:9/hook", "webhook_events": events}
    with stack.client() as client:
        response = client.post("/v1/generations", json=body)
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["field"] == "webhook_events.1" and "batch event" in error["message"]


def test_every_event_is_delivered_signed_and_as_the_spec_describes_it(
    stack: Stack, webhook_receiver: HttpReceiver, spec: dict[str, Any]
) -> None:
    base = webhook_receiver.url
    every = {"webhook_events": GENERATION}
    ok = submit(stack, "/v1/generations", {**SMALL, **every, "prompt": "a fox", "webhook_url": f"{base}/ok"})
    doomed = submit(
        stack,
        "/v1/generations",
        {
            **SMALL,
            "prompt": "a fox",
            "loras": [{"name": "ghost", "scale": 1.0}],
            "webhook_url": f"{base}/doomed",
            "webhook_events": ["completed"],  # an alias: the three terminal events
        },
    )
    batch = submit(
        stack,
        "/v1/batches",
        {
            "template": {**SMALL, "prompt": "a lighthouse"},
            "count": 2,
            "webhook_url": f"{base}/batch",
            "webhook_events": [*GENERATION, "batch.completed"],
        },
    )
    with stack.client() as client:
        hooked = {**SMALL, "prompt": "never", "num_inference_steps": 50, "webhook_url": f"{base}/canceled"}
        canceled = submit(stack, "/v1/generations", {**hooked, **every})
        assert client.post(f"/v1/generations/{canceled['id']}/cancel").status_code in (200, 202)

    jobs = [ok, doomed, canceled]
    for job in jobs:
        stack.wait_for(job["id"], {"succeeded", "failed", "canceled"}, timeout=120)
    wait_all_delivered(stack, [f"/v1/generations/{job['id']}" for job in jobs])
    with stack.client() as client:
        done = client.get(f"/v1/batches/{batch['id']}").json()
    item_paths = [f"/v1/generations/{item['id']}" for item in done["items"]]
    wait_all_delivered(stack, [f"/v1/batches/{batch['id']}", *item_paths], timeout=120)
    with stack.client() as client:
        read = {path: client.get(path).json() for path in [f"/v1/generations/{j['id']}" for j in jobs]}
    assert [job["status"] for job in read.values()] == ["succeeded", "failed", "canceled"]
    assert next(iter(read.values()))["webhook"]["events"] == GENERATION
    assert list(read.values())[1]["error"]["type"] == "lora_unavailable"
    assert list(read.values())[1]["webhook"]["events"] == GENERATION[2:]  # the alias, normalised

    verifier = Webhook(TEST_WEBHOOK_SECRET)
    validators = {event.value: payload_validator(spec, event.value) for event in WebhookEvent}
    seen: dict[str, set[str]] = defaultdict(set)
    for request in webhook_receiver.requests:
        payload = verifier.verify(request.body, dict(request.headers))
        name = request.path.rsplit("/", 1)[1]
        errors = [error.message for error in validators[payload["type"]].iter_errors(payload)]
        assert not errors, (payload["type"], errors)
        seen[name].add(payload["type"])

    assert seen["ok"] == {"generation.started", "generation.progress", "generation.succeeded"}
    assert seen["doomed"] == {"generation.failed"}
    assert seen["canceled"] <= {"generation.started", "generation.progress", "generation.canceled"}
    assert "generation.canceled" in seen["canceled"]
    assert seen["batch"] == {
        "generation.started",
        "generation.progress",
        "generation.succeeded",
        "batch.completed",
    }
    every_type = set().union(*seen.values())
    assert every_type == {event.value for event in WebhookEvent}
