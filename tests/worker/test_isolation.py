"""Per-job fault isolation in the worker, on the real stack (issue #16, worker side).

One job's encoding, content check or upload concerns that job alone: a request no other tenant can see
must never fail the jobs coalesced into the same pipeline call. The shared backend's worker coalesces up
to 4 jobs; a long job holds it while the group queues up (``queue_behind_busy_worker``).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.fixtures.stack import Stack, api_stack
from tests.worker.test_coalescing import (
    SMALL,
    TERMINAL,
    coalesced_with,
    queue_behind_busy_worker,
    wait_until,
)
from worker.encoding import TRUNCATED_MARKER, read_exif_parameters

#: 10,000 emoji: the longest prompt the schema accepts, 4 bytes each in UTF-16 (EXIF UserComment).
EMOJI_PROMPT = "\U0001f600" * 10_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, shared_backend: Stack) -> Iterator[Stack]:
    yield from api_stack(shared_backend, tmp_path_factory.mktemp("stack-isolation"))


def test_a_job_whose_metadata_overflows_exif_neither_fails_its_group_nor_itself(stack: Stack) -> None:
    guided: dict[str, Any] = {**SMALL, "guidance_scale": 2.0, "output_format": "jpeg"}
    poisoned = {**guided, "prompt": EMOJI_PROMPT, "negative_prompt": EMOJI_PROMPT, "seed": 30}
    normal = {**guided, "prompt": "a quiet harbour at dawn", "seed": 31}
    with stack.client() as client:
        ids = queue_behind_busy_worker(client, [poisoned, normal])
        jobs = [wait_until(client, job_id, lambda j: j["status"] in TERMINAL) for job_id in ids]

    # They shared one pipeline call, and each ended on its own terms: both succeeded.
    assert [(job["status"], job["error"]) for job in jobs] == [("succeeded", None)] * 2
    assert [coalesced_with(stack, job_id) for job_id in ids] == [2, 2]
    # The image was produced; its EXIF parameters were shortened, with a marker, to fit JPEG's 64 KB.
    data = httpx.get(jobs[0]["images"][0]["url"], timeout=10).content
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
    parameters = read_exif_parameters(data)
    assert TRUNCATED_MARKER in parameters
    assert parameters.split("\n")[-1].startswith("Steps: 2, ")  # the settings line is kept whole
