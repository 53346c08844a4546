"""A full disk is not an outage (issue #16, case 13): the job fails ``storage_error`` at once, the worker
carries on, and the refusal is counted on the worker's /metrics.

The disk is really full: the worker runs in a user and mount namespace (``unshare -rm``, no root needed)
where its storage folder is a 32 KiB tmpfs, so the upload of a generated image ends in ``ENOSPC`` from
the kernel. Before, that was retried as if transient until ``DARKROOM_STORAGE_RETRY_DEADLINE``, holding the
GPU, and then reported ``storage_unavailable``.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from devtools.net import free_port
from services.storage import FileStorage, StorageUnavailable, StorageWriteRefused
from tests.fixtures.stack import TINY_WORKERS, Stack, stack_env

DEADLINE_S = 30  # the storage retry deadline: a full disk must fail well before it
JOB = {"prompt": "a full disk", "width": 512, "height": 512, "num_inference_steps": 2, "seed": 5}


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=32k tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _namespaces_work(), reason="needs unprivileged user namespaces (unshare -rm) to mount a small tmpfs"
)


@pytest.fixture(scope="module")
def full_disk_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack-full-disk")
    outputs = tmp / "outputs"
    outputs.mkdir()
    metrics_port = free_port()
    env = {**stack_env(tiny_model_dir), "DARKROOM_STORAGE_RETRY_DEADLINE": str(DEADLINE_S)}
    worker_env = {"OMP_NUM_THREADS": "1", "DARKROOM_WORKER_METRICS_PORT": str(metrics_port)}
    with Stack(tmp, env=env, storage_url=f"file://{outputs}", worker=False) as stack:
        mount_then_run = f"mount -t tmpfs -o size=32k tmpfs '{outputs}' && exec '{sys.executable}' -m worker"
        stack.spawn("worker", ["unshare", "-rm", "sh", "-c", mount_then_run], worker_env)
        stack.worker_metrics_port = metrics_port
        with stack.redis() as connection:
            deadline = time.monotonic() + 120
            while not connection.smembers(TINY_WORKERS):
                assert time.monotonic() < deadline, stack.logs("worker")
                assert stack.processes["worker"].poll() is None, stack.logs("worker")
                time.sleep(0.1)
        yield stack


def run_seconds(job: dict[str, object]) -> float:
    started, completed = (datetime.fromisoformat(str(job[name])) for name in ("started_at", "completed_at"))
    return (completed - started).total_seconds()


@needs_namespaces
def test_a_full_disk_fails_the_job_at_once_and_the_worker_goes_on(full_disk_stack: Stack) -> None:
    stack = full_disk_stack
    with stack.client() as client:
        ids = [client.post("/v1/generations", json={**JOB, "seed": seed}).json()["id"] for seed in (5, 6)]
        jobs = [stack.wait_for(job_id, {"succeeded", "failed", "canceled"}, timeout=90) for job_id in ids]

    for job in jobs:
        assert job["status"] == "failed", job
        assert job["error"]["type"] == "storage_error", job
        assert "No space left on device" in job["error"]["message"], job
        assert run_seconds(job) < DEADLINE_S / 3, job  # not retried until the deadline
    assert stack.processes["worker"].poll() is None  # the worker carries on
    text = httpx.get(f"http://127.0.0.1:{stack.worker_metrics_port}/metrics", timeout=10).text
    assert 'darkroom_storage_writes_refused_total{reason="no_space"} 2.0' in text
    assert "storage refuses writes" in stack.logs("worker")


def test_errors_an_operator_must_fix_are_not_retried(tmp_path: Path) -> None:
    """The classification itself, for every errno it covers: a FileStorage whose writes raise them."""

    class FailingDisk(FileStorage):
        error = OSError(errno.ENOSPC, "No space left on device")

        def put(self, key: str, data: bytes, content_type: str) -> None:
            from services.storage import local

            with local._translated_os_errors("put", key):
                raise self.error

    storage = FailingDisk(tmp_path)
    cases = {
        errno.ENOSPC: "no_space",
        errno.EDQUOT: "quota_exceeded",
        errno.EROFS: "read_only",
        errno.EFBIG: "file_too_large",
    }
    for number, reason in cases.items():
        storage.error = OSError(number, "refused")
        with pytest.raises(StorageWriteRefused) as refused:
            storage.put("a.png", b"x", "image/png")
        assert refused.value.reason == reason and refused.value.code == "storage_error"
    storage.error = OSError(errno.EIO, "I/O error")  # a flaky mount may come back: still retried
    with pytest.raises(StorageUnavailable):
        storage.put("a.png", b"x", "image/png")
