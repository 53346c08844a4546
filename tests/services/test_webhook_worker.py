"""The webhook worker as operators run it: ``python -m services.webhooks`` in its own process, configured
only through ``DARKROOM_*`` variables, against real Redis and real loopback receivers.

What only a real process shows: retries actually fire through RQ's scheduler (``enqueue_in`` needs
``with_scheduler``), the task is importable by its dotted path, SIGTERM is a warm shutdown with exit code
0, logs go to stderr, and metrics are served on the configured port.

Timing: backoff is 0.2 s, but RQ's scheduler looks for due jobs about once a second, so each retry costs
about a second. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from rq.registry import ScheduledJobRegistry

from devtools.net import free_port
from services.clients import ServiceClients, build_clients
from services.jobs.keys import ARCHIVE_DUE, OUTBOX, job_key
from services.queue import webhook_queue
from services.settings import Settings
from services.storage import FileStorage
from tests.fixtures.http_receiver import HttpReceiver, Reply
from tests.services.test_webhook_tasks import SECRET, create_job, make_settings, verified

REPO_ROOT = Path(__file__).resolve().parents[2]
PROCESS_TIMEOUT_S = 20.0


class StartWorker(Protocol):
    def __call__(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]: ...


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The child's environment: ours minus any DARKROOM_* leaking in, plus the test settings."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("DARKROOM_")}
    env.update(
        {
            "DARKROOM_REDIS_URL": settings.redis_url,
            "DARKROOM_STORAGE_URL": settings.storage_url,
            "DARKROOM_PUBLIC_URL": settings.public_url or "",
            "DARKROOM_WEBHOOK_SECRET": SECRET,
            "DARKROOM_WEBHOOK_ALLOW_PRIVATE": "true",
            "DARKROOM_WEBHOOK_ALLOW_HTTP": "true",
            # ISO 8601 durations: pydantic reads a bare "0.2" from the environment as an invalid timedelta.
            "DARKROOM_WEBHOOK_TIMEOUT": "PT2S",
            "DARKROOM_WEBHOOK_BACKOFF_BASE": "PT0.2S",
            "DARKROOM_WEBHOOK_MAX_ATTEMPTS": str(settings.webhook_max_attempts),
            "DARKROOM_ENVIRONMENT": "production",  # JSON log lines, checked below
            **extra,
        }
    )
    return env


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` (a Redis read) until truthy; fail after ``timeout``. Used only where no event
    can be awaited: the worker records an attempt after the receiver has already answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def delivery_state(clients: ServiceClients, job_id: str, *states: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        deliveries = clients.store.deliveries(job_id)
        return deliveries[0] if deliveries and deliveries[0]["state"] in states else None

    return check


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return make_settings(redis_url, tmp_path)


@pytest.fixture
def clients(settings: Settings) -> Iterator[ServiceClients]:
    built = build_clients(settings)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def storage(clients: ServiceClients) -> FileStorage:
    assert isinstance(clients.storage, FileStorage)
    return clients.storage


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[StartWorker]:
    """Start ``python -m services.webhooks``; output goes to files (a full pipe would block the child).
    Any process still alive at teardown is killed."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        index = len(processes)
        with (
            open(tmp_path / f"worker-{index}.out", "wb") as out,
            open(tmp_path / f"worker-{index}.err", "wb") as err,
        ):
            process = subprocess.Popen(
                [sys.executable, "-m", "services.webhooks", *args],
                cwd=REPO_ROOT,
                env=env or worker_env(settings),
                stdout=out,
                stderr=err,
            )
        processes.append(process)
        return process

    try:
        yield start
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=PROCESS_TIMEOUT_S)


def test_retries_until_delivered_then_exits_0_on_sigterm(
    settings: Settings,
    clients: ServiceClients,
    storage: FileStorage,
    webhook_receiver: HttpReceiver,
    start_worker: StartWorker,
    tmp_path: Path,
) -> None:
    webhook_receiver.script([500, 500, 200])
    job_id = create_job(clients, storage, webhook_receiver.url)  # its generation.succeeded: in the outbox
    metrics_port = free_port()

    worker = start_worker(env=worker_env(settings, DARKROOM_WORKER_METRICS_PORT=str(metrics_port)))

    requests = webhook_receiver.wait_for(3, timeout=PROCESS_TIMEOUT_S)
    [msg_id] = [d["msg_id"] for d in clients.store.deliveries(job_id)]
    assert [r.headers["webhook-id"] for r in requests] == [msg_id] * 3  # one id: receivers can dedupe
    assert {verified(r)["type"] for r in requests} == {"generation.succeeded"}
    delivery = wait_until(delivery_state(clients, job_id, "delivered"), what="delivered state")
    assert [(a["attempt"], a["status_code"]) for a in delivery["attempts"]] == [(1, 500), (2, 500), (3, 200)]

    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    assert 'darkroom_webhook_attempts_total{outcome="retry"} 2.0' in metrics
    assert 'darkroom_webhook_attempts_total{outcome="delivered"} 1.0' in metrics
    exported = {line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE darkroom_")}
    assert exported == {
        "darkroom_webhook_attempts_total"
    }  # its own family only (issue 15), no _created series
    assert "_created" not in metrics

    assert stop(worker) == 0
    # Logs: on stderr, one JSON object per line, with the job and message ids as fields.
    records = [json.loads(line) for line in (tmp_path / "worker-0.err").read_text().splitlines() if line]
    assert (tmp_path / "worker-0.out").read_text() == ""
    assert any(r.get("event") == "webhook.attempt" and r.get("msg_id") == msg_id for r in records)


def test_410_and_400_stop_at_once_and_burst_mode_exits_when_done(
    settings: Settings,
    clients: ServiceClients,
    storage: FileStorage,
    webhook_receiver: HttpReceiver,
    start_worker: StartWorker,
) -> None:
    queue = webhook_queue(clients.redis, settings)
    with HttpReceiver() as other_receiver:
        webhook_receiver.script([410])
        other_receiver.script([400])
        gone_job = create_job(clients, storage, webhook_receiver.url)
        bad_job = create_job(clients, storage, other_receiver.url)
        # One event each: their generation.succeeded (generation.started was not subscribed to).
        assert clients.redis.xlen(OUTBOX) == 2

        worker = start_worker("--burst")

        assert worker.wait(timeout=PROCESS_TIMEOUT_S) == 0
        assert len(webhook_receiver.requests) == 1
        assert len(other_receiver.requests) == 1
    [gone] = clients.store.deliveries(gone_job)
    [failed] = clients.store.deliveries(bad_job)
    assert (gone["state"], [a["status_code"] for a in gone["attempts"]]) == ("gone", [410])
    assert (failed["state"], [a["status_code"] for a in failed["attempts"]]) == ("failed", [400])
    assert ScheduledJobRegistry(queue=queue).count == 0 and queue.count == 0


def test_sigterm_during_an_attempt_finishes_and_records_it(
    settings: Settings,
    clients: ServiceClients,
    storage: FileStorage,
    webhook_receiver: HttpReceiver,
    start_worker: StartWorker,
) -> None:
    webhook_receiver.script([Reply(200, delay_s=1.0)])
    job_id = create_job(clients, storage, webhook_receiver.url)
    worker = start_worker()
    webhook_receiver.wait_for(1, timeout=PROCESS_TIMEOUT_S)  # the attempt is now in flight

    assert stop(worker) == 0

    delivery = delivery_state(clients, job_id, "delivered")()
    assert delivery is not None, clients.store.deliveries(job_id)
    assert [a["status_code"] for a in delivery["attempts"]] == [200]


def test_a_job_is_archived_once_its_webhook_is_delivered(
    settings: Settings,
    clients: ServiceClients,
    storage: FileStorage,
    webhook_receiver: HttpReceiver,
    start_worker: StartWorker,
) -> None:
    """The archiver runs in this process: a finished job whose delivery is final goes to storage and its
    Redis keys get the short TTL (its loop in a long-running worker; a pass at the end in burst mode)."""
    webhook_receiver.script([200])
    job_id = create_job(clients, storage, webhook_receiver.url)

    worker = start_worker("--burst")
    assert worker.wait(timeout=PROCESS_TIMEOUT_S) == 0

    archived = clients.archive.job(job_id)
    assert archived is not None and [d["state"] for d in archived.deliveries] == ["delivered"]
    assert archived.record == clients.store.get(job_id)
    assert 0 < clients.redis.ttl(job_key(job_id)) <= settings.finished_ttl.total_seconds()
    assert clients.redis.zcard(ARCHIVE_DUE) == 0
