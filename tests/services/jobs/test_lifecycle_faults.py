"""A job's events survive the processes around them: real stacks (Redis with AOF, the API under uvicorn, a
tiny-model GPU worker, the webhook process), processes killed with SIGKILL, receivers that verify every
delivery with the ``standardwebhooks`` reference library.

- a worker dies on a job's last allowed attempt: the job fails ``worker_lost`` and ``generation.failed``
  arrives, once;
- a worker dies right after recording an outcome, before anything else: the event arrives, once;
- the webhook process dies holding outbox entries it read: a new one delivers them, once each;
- Redis restarts with events waiting in the outbox: none is lost.

Faults are injected from outside the product: the process under test gets a ``sitecustomize.py`` on its
``PYTHONPATH`` that kills it at the chosen point. No switch in production code could do this by accident.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from devtools.net import free_port
from services.jobs.keys import OUTBOX, OUTBOX_GROUP
from tests.fixtures.http_receiver import HttpReceiver, RecordedRequest
from tests.fixtures.stack import ONE_THREAD, TEST_WEBHOOK_SECRET, Stack, start_stack, stop_process

# Four stacks and four kills, ~2 minutes on 2 cores: in `make test-slow` (which CI runs). The logic they
# rest on is covered in the default suite by test_lifecycle.py and test_webhook_dispatcher.py.
pytestmark = pytest.mark.slow

MARKER = "__die_after_outcome__"
TERMINAL = {"succeeded", "failed", "canceled"}
SMALL: dict[str, Any] = {"width": 512, "height": 512, "num_inference_steps": 2, "guidance_scale": 1.0}

# Killed the moment the lifecycle has recorded the outcome of a job whose prompt carries the marker:
# nothing after the transition runs (no log line, no RQ bookkeeping, no heartbeat cleanup).
DIE_AFTER_OUTCOME = f"""
import os, signal, sys
sys.path.insert(0, os.getcwd())
from services.jobs import lifecycle

_finish = lifecycle.Lifecycle.finish


def finish(self, record, worker, outcome, *, at=None):
    done = _finish(self, record, worker, outcome, at=at)
    if done.applied and {MARKER!r} in str(record.request.get("prompt")):
        os.kill(os.getpid(), signal.SIGKILL)
    return done


lifecycle.Lifecycle.finish = finish
print("fault injection: SIGKILL after recording an outcome", file=sys.stderr)
"""

# Killed on the first outbox entry it handles: the entries of that read stay pending under its name.
DIE_ON_FIRST_DISPATCH = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
from services.webhooks import dispatcher


def decide(self, events):
    os.kill(os.getpid(), signal.SIGKILL)


dispatcher.OutboxDispatcher.decide = decide
print("fault injection: SIGKILL on the first outbox entry", file=sys.stderr)
"""


def inject(tmp: Path, name: str, source: str) -> dict[str, str]:
    folder = tmp / name
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(source)
    return {"PYTHONPATH": str(folder)}


def spawn(stack: Stack, name: str, module: str, **env: str) -> subprocess.Popen[bytes]:
    stack.spawn(name, [sys.executable, "-m", module], env)
    return stack.processes[name]


def submit(stack: Stack, receiver: HttpReceiver, prompt: str, **extra: Any) -> str:
    body = {**SMALL, "prompt": prompt, "webhook_url": receiver.url + "/hook", **extra}
    with stack.client() as client:
        answer = client.post("/v1/generations", json=body)
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def verified(requests: list[RecordedRequest]) -> list[dict[str, Any]]:
    """Every delivery checked with the reference library, as a receiver would."""
    return [Webhook(TEST_WEBHOOK_SECRET).verify(r.body, dict(r.headers)) for r in requests]


def no_more(receiver: HttpReceiver, count: int, seconds: float = 3.0) -> None:
    """Nothing beyond the first ``count`` deliveries arrives within ``seconds``."""
    with pytest.raises(AssertionError):
        receiver.wait_for(count + 1, timeout=seconds)


def wait_exit(process: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    return process.wait(timeout=timeout)


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process ``pid`` has ended within ``timeout`` (an orphan is reaped by init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "State:\tZ" in status.read_text():
            return True
        time.sleep(0.05)
    return False


# --- the GPU worker ----------------------------------------------------------------------------------------


@pytest.fixture
def lossy_stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Stack]:
    """One attempt allowed, lost after 3 s of silence (heartbeat 1 s)."""
    yield from start_stack(
        tmp_path,
        f"file://{tmp_path / 'outputs'}",
        tiny_model_dir,
        extra_env={"DARKROOM_MAX_ATTEMPTS": "1", "DARKROOM_LOST_AFTER": "3"},
        process_env=ONE_THREAD,
    )


def test_a_worker_killed_on_the_last_attempt_fails_the_job_with_one_webhook(
    lossy_stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    stack = lossy_stack
    job_id = submit(stack, webhook_receiver, "a red fox", num_inference_steps=100)
    with stack.client() as client:
        deadline = time.monotonic() + 60
        while (job := client.get(f"/v1/generations/{job_id}").json())["progress"] is None:
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
    stack.processes["worker"].kill()  # SIGKILL mid-run, on its one allowed attempt
    stack.processes["worker"].wait(timeout=10)
    metrics_port = free_port()
    spawn(stack, "worker-2", "worker", DARKROOM_WORKER_METRICS_PORT=str(metrics_port), OMP_NUM_THREADS="1")

    done = stack.wait_for(job_id, TERMINAL, timeout=60)
    assert done["status"] == "failed" and done["error"]["type"] == "worker_lost", done
    [payload] = verified(webhook_receiver.wait_for(1, timeout=30))
    assert payload["type"] == "generation.failed"
    assert payload["data"]["id"] == job_id and payload["data"]["error"]["type"] == "worker_lost"
    no_more(webhook_receiver, 1)
    # The process that failed it (recovery, in the new worker) counted it.
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    assert 'darkroom_generation_jobs_total{outcome="failed"} 1.0' in metrics


@pytest.fixture
def dying_worker_stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Stack]:
    env = {**ONE_THREAD["worker"], **inject(tmp_path, "inject", DIE_AFTER_OUTCOME)}
    yield from start_stack(
        tmp_path, f"file://{tmp_path / 'outputs'}", tiny_model_dir, process_env={"worker": env}
    )


def test_a_worker_killed_right_after_recording_an_outcome_still_notifies_once(
    dying_worker_stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    stack = dying_worker_stack
    assert "fault injection: SIGKILL after recording an outcome" in stack.logs("worker")
    job_id = submit(stack, webhook_receiver, f"a red fox {MARKER}")
    assert wait_exit(stack.processes["worker"]) == -9  # died on the spot, outcome recorded
    done = stack.wait_for(job_id, TERMINAL, timeout=10)
    assert done["status"] == "succeeded" and len(done["images"]) == 1
    [payload] = verified(webhook_receiver.wait_for(1, timeout=30))
    assert payload["type"] == "generation.succeeded" and payload["data"]["id"] == job_id
    # A new worker runs recovery: the job is over, so nothing is re-run or re-sent.
    spawn(stack, "worker-2", "worker", OMP_NUM_THREADS="1", PYTHONPATH="")
    no_more(webhook_receiver, 1, seconds=4)
    with stack.client() as client:
        assert client.get(f"/v1/generations/{job_id}").json()["started_at"] == done["started_at"]


# --- the webhook process -----------------------------------------------------------------------------------


@pytest.fixture
def dying_webhooks_stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Stack]:
    env = inject(tmp_path, "inject", DIE_ON_FIRST_DISPATCH)
    yield from start_stack(
        tmp_path,
        f"file://{tmp_path / 'outputs'}",
        tiny_model_dir,
        extra_env={"DARKROOM_OUTBOX_CLAIM_IDLE": "1"},
        process_env={"webhooks": env, **ONE_THREAD},
    )


def test_a_webhook_process_killed_with_entries_pending_leaves_them_to_the_next(
    dying_webhooks_stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    stack = dying_webhooks_stack
    scheduler = children(stack.processes["webhooks"].pid)  # RQ's scheduler, forked by the worker
    job_ids = [
        submit(stack, webhook_receiver, f"fox {n}", webhook_events=["started", "completed"]) for n in range(2)
    ]
    for job_id in job_ids:
        stack.wait_for(job_id, TERMINAL, timeout=60)
    assert wait_exit(stack.processes["webhooks"]) == -9  # it read entries, then died holding them
    # Its scheduler goes with it: left alive, it would hold the dead worker's blocking dequeue open, and
    # Redis would hand that dequeue the next delivery attempt, which nobody would ever read.
    assert scheduler and all(gone(pid) for pid in scheduler)
    with stack.redis() as redis:
        assert redis.xpending(OUTBOX, OUTBOX_GROUP)["pending"] >= 1
    spawn(stack, "webhooks-2", "services.webhooks", PYTHONPATH="")

    payloads = verified(webhook_receiver.wait_for(4, timeout=30))
    no_more(webhook_receiver, 4)
    assert sorted((p["data"]["id"], p["type"]) for p in payloads) == sorted(
        (job_id, kind) for job_id in job_ids for kind in ("generation.started", "generation.succeeded")
    )
    ids = [r.headers["webhook-id"] for r in webhook_receiver.requests]
    assert len(set(ids)) == 4
    with stack.redis() as redis:
        assert redis.xlen(OUTBOX) == 0


# --- Redis -------------------------------------------------------------------------------------------------


@pytest.fixture
def plain_stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Stack]:
    yield from start_stack(tmp_path, f"file://{tmp_path / 'outputs'}", tiny_model_dir, process_env=ONE_THREAD)


def test_events_waiting_in_the_outbox_survive_a_redis_restart(
    plain_stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    stack = plain_stack
    assert stop_process(stack.processes.pop("webhooks")) == 0  # nobody dispatches for now
    job_ids = [submit(stack, webhook_receiver, f"fox {n}") for n in range(3)]
    for job_id in job_ids:
        assert stack.wait_for(job_id, TERMINAL, timeout=60)["status"] == "succeeded"
    with stack.redis() as redis:
        assert redis.xlen(OUTBOX) == 3
    with stack.client() as client:  # what an operator sees: events waiting for a webhook process
        assert "darkroom_outbox_backlog 3.0" in client.get("/metrics").text
    assert stack.redis_server is not None
    stack.redis_server.stop()  # SIGTERM: Redis writes its AOF out and exits
    stack.redis_server.restart()
    spawn(stack, "webhooks-2", "services.webhooks")

    payloads = verified(webhook_receiver.wait_for(3, timeout=30))
    no_more(webhook_receiver, 3)
    assert sorted(p["data"]["id"] for p in payloads) == sorted(job_ids)
    assert {p["type"] for p in payloads} == {"generation.succeeded"}
