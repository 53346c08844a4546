"""One running stack for the client and CLI tests, and a job that keeps the single worker busy.

Package-scoped so ``test_client.py`` and ``test_cli.py`` share one Redis + API + worker + webhook worker
(starting them is most of the suite's time). Tests leave the queue empty behind them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from darkroom_client import DarkroomClient, DarkroomError, JobStatus
from tests.fixtures.stack import Stack, start_stack

SMALL: dict[str, Any] = {
    "prompt": "a red fox in the snow",
    "width": 512,
    "height": 512,
    "num_inference_steps": 4,
}
LONG: dict[str, Any] = {**SMALL, "prompt": "a very long exposure", "num_inference_steps": 100}
TERMINAL = {status.value for status in JobStatus if status.is_terminal}


@pytest.fixture(scope="package")
def client_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("client-stack")
    yield from start_stack(tmp, f"file://{tmp / 'outputs'}", tiny_model_dir)


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
