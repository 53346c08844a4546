"""``python -m services.archiver`` as its own process (how the Kubernetes manifests run it): against a real
Redis and file storage it archives a finished job, holds the archive lease while it runs, and on SIGTERM
releases the lease and exits 0. A webhook process told not to archive leaves the job to it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from services.clients import ServiceClients
from services.jobs.archive import job_object_key
from services.jobs.keys import ARCHIVE_DUE, ARCHIVE_LEASE, job_key
from services.settings import Settings
from services.storage import FileStorage
from tests.fixtures.finished import finished_job
from tests.services import test_webhook_worker as worker_tests
from tests.services.test_webhook_worker import wait_until, worker_env

settings = worker_tests.settings
clients = worker_tests.clients
storage = worker_tests.storage

ROOT = Path(__file__).resolve().parents[2]


def test_the_archiver_process_archives_a_finished_job_and_hands_its_lease_back_on_sigterm(
    settings: Settings, clients: ServiceClients, storage: FileStorage
) -> None:
    record = finished_job(clients.redis, storage)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.archiver"],
        cwd=ROOT,
        env=worker_env(settings, DARKROOM_FINISHED_TTL="PT60S"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: clients.redis.zscore(ARCHIVE_DUE, f"job:{record.id}") is None, timeout=30)
        assert storage.exists(job_object_key(record.id))
        assert 0 < clients.redis.ttl(job_key(record.id)) <= 60
        assert clients.redis.get(ARCHIVE_LEASE) is not None  # held while it runs
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert clients.redis.get(ARCHIVE_LEASE) is None  # a standby takes over at once
    assert process.stderr is not None and b"archiver.stopped" in process.stderr.read()


def test_a_webhook_process_told_not_to_archive_leaves_finished_jobs_to_the_archivers(
    settings: Settings, clients: ServiceClients, storage: FileStorage
) -> None:
    record = finished_job(clients.redis, storage)
    env = worker_env(settings, DARKROOM_ARCHIVER_IN_WEBHOOK_PROCESS="false")
    done = subprocess.run(
        [sys.executable, "-m", "services.webhooks", "--burst"], cwd=ROOT, env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert clients.redis.zscore(ARCHIVE_DUE, f"job:{record.id}") is not None  # still due
    assert not storage.exists(job_object_key(record.id))
    env["DARKROOM_ARCHIVER_IN_WEBHOOK_PROCESS"] = "true"  # the default: the same run archives it
    assert (
        subprocess.run([sys.executable, "-m", "services.webhooks", "--burst"], cwd=ROOT, env=env).returncode
        == 0
    )
    assert storage.exists(job_object_key(record.id))
