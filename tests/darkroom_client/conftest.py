"""One running stack for the client and CLI tests, and a job that keeps the single worker busy.

Package-scoped so every module here shares one Redis + API + worker + webhook worker (starting them is most
of the suite's time). The stack offers the tiny model's two test LoRAs (``ink``, ``rust``), so ``--lora``
runs end to end, and a second model, ``tiny-b``, that no worker serves: its jobs and batch items stay
queued (never wait on them), which makes them cheap subjects for listing and ``--model``. Tests leave the
queues empty behind them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from darkroom_client import DarkroomClient, DarkroomError, JobStatus
from tests.fixtures.stack import Stack, api_stack

SMALL: dict[str, Any] = {
    "prompt": "a red fox in the snow",
    "width": 512,
    "height": 512,
    "num_inference_steps": 4,
}
LONG: dict[str, Any] = {**SMALL, "prompt": "a very long exposure", "num_inference_steps": 100}
#: The cheapest request the API takes (512x512 is the smallest square: 0.25 megapixels) at two steps, for
#: tests about what the client sends rather than about the images.
TINY: dict[str, Any] = {**SMALL, "num_inference_steps": 2}
TERMINAL = {status.value for status in JobStatus if status.is_terminal}
#: A model the API accepts (DARKROOM_MODELS) but no worker serves: 0 ready workers, its jobs wait.
UNSERVED_MODEL = "tiny-b"


@pytest.fixture(scope="package")
def client_stack(
    tmp_path_factory: pytest.TempPathFactory, shared_backend: Stack, tiny_loras: dict[str, str]
) -> Iterator[Stack]:
    env = {  # the LoRAs the shared worker was started with, and a model no worker serves
        "DARKROOM_LORAS": json.dumps(tiny_loras),
        "DARKROOM_MODELS": UNSERVED_MODEL,
    }
    yield from api_stack(shared_backend, tmp_path_factory.mktemp("client-stack"), env)


@pytest.fixture
def client(client_stack: Stack) -> Iterator[DarkroomClient]:
    with DarkroomClient(client_stack.api_url, timeout=30) as darkroom:
        yield darkroom


@pytest.fixture
def blocker(client_stack: Stack, client: DarkroomClient) -> Iterator[str]:
    """A long job already running, so the next one submitted waits at queue position 1; canceled after."""
    job = client.generate(LONG)
    client_stack.wait_for(job.id, {"running"})
    yield job.id
    try:
        client.cancel(job.id)
    except DarkroomError as exc:
        assert exc.code == "job_already_finished"
    client_stack.wait_for(job.id, TERMINAL)


class RecordingTransport(httpx.HTTPTransport):
    """The real transport, noting each request; optionally answers event-stream requests with HTML instead,
    as a buffering proxy that does not understand SSE would."""

    def __init__(self, break_event_streams: bool = False) -> None:
        super().__init__()
        self.requests: list[str] = []
        self.break_event_streams = break_event_streams

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if self.break_event_streams and request.url.path.endswith("/events"):
            return httpx.Response(200, html="<html>proxy says hi</html>")
        return super().handle_request(request)

    def count(self, suffix: str) -> int:
        return sum(1 for line in self.requests if line.endswith(suffix))
