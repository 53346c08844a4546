"""Fault 6: the device runs out of memory during a generation.

That job fails with ``out_of_memory`` (and a message saying what to change); the same worker process, with
the same warm pipeline, then runs the next job to success.

The fault is injected from outside the product: only the worker under test gets a ``sitecustomize.py`` on
its ``PYTHONPATH`` that makes diffusers' SD3 transformer raise ``torch.OutOfMemoryError`` on its second
forward pass (mid-denoising, after a progress step) of a generation whose prompt carries the marker. No
switch in the production code could turn this on by accident.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.jobs import job_key
from tests.fixtures.stack import ONE_THREAD, Stack, start_stack

MARKER = "__oom__"
SMALL: dict[str, Any] = {"prompt": "a red fox", "width": 512, "height": 512, "num_inference_steps": 4}

SITECUSTOMIZE = f'''
"""Test-only fault injection (tests/worker/test_out_of_memory.py): out of memory mid-denoising."""
import functools
import sys

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

_armed = {{"forward_calls": None}}
_call = StableDiffusion3Pipeline.__call__
_forward = SD3Transformer2DModel.forward


@functools.wraps(_call)
def __call__(self, *args, **kwargs):
    prompt = kwargs.get("prompt", args[0] if args else None)
    _armed["forward_calls"] = 0 if isinstance(prompt, str) and {MARKER!r} in prompt else None
    try:
        return _call(self, *args, **kwargs)
    finally:
        _armed["forward_calls"] = None


@functools.wraps(_forward)
def forward(self, *args, **kwargs):
    if _armed["forward_calls"] is not None:
        _armed["forward_calls"] += 1
        if _armed["forward_calls"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
    return _forward(self, *args, **kwargs)


StableDiffusion3Pipeline.__call__ = __call__
SD3Transformer2DModel.forward = forward
print("fault injection: out of memory for prompts containing {MARKER}", file=sys.stderr)
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack-oom")
    inject = tmp / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    yield from start_stack(
        tmp,
        f"file://{tmp / 'outputs'}",
        tiny_model_dir,
        process_env={
            "worker": {
                **ONE_THREAD["worker"],
                "PYTHONPATH": str(inject),
                # The injection reads the prompt text from the pipeline call: keep it there. A coalesced
                # call (or cached embeddings) passes embeddings instead; out of memory in a coalesced call
                # is tested in tests/worker/test_engine_coalescing.py. Coalescing is off by default; said
                # here all the same, since this test depends on it.
                "DARKROOM_COALESCE_MAX": "1",
                "DARKROOM_PROMPT_CACHE_SIZE": "0",
            }
        },
    )


def test_an_out_of_memory_job_fails_alone_and_the_worker_takes_the_next(stack: Stack) -> None:
    assert "fault injection: out of memory" in stack.logs("worker")
    with stack.client() as client:
        started = time.monotonic()
        doomed = client.post("/v1/generations", json={**SMALL, "prompt": f"a red fox {MARKER}"}).json()
        following = client.post("/v1/generations", json={**SMALL, "seed": 8}).json()
    failed = stack.wait_for(doomed["id"], {"succeeded", "failed", "canceled"})
    failed_after = time.monotonic() - started
    assert failed["status"] == "failed", failed
    assert failed["error"]["type"] == "out_of_memory"
    assert "out of memory" in failed["error"]["message"] and "smaller size" in failed["error"]["message"]
    assert failed["progress"] == {"step": 1, "total": 4}  # it struck mid-denoising
    assert failed["images"] == []

    succeeded = stack.wait_for(following["id"], {"succeeded", "failed", "canceled"})
    succeeded_after = time.monotonic() - started
    assert succeeded["status"] == "succeeded", succeeded
    assert len(succeeded["images"]) == 1
    redis = stack.redis()
    same_worker = {redis.hget(job_key(job["id"]), "worker") for job in (failed, succeeded)}
    assert len(same_worker) == 1 and None not in same_worker  # one process ran both: no restart
    assert stack.processes["worker"].poll() is None
    print(f"\nOOM: job failed after {failed_after:.1f}s, the next job succeeded after {succeeded_after:.1f}s")
