"""``python -m services.archiver``: archive finished jobs in a process of their own (DARKROOM_* settings).

The webhook process archives too, in a side thread, unless ``DARKROOM_ARCHIVER_IN_WEBHOOK_PROCESS`` is
false. Apart is how a fleet runs it: archiving writes one storage object per finished job, and that CPU
and I/O would otherwise come out of webhook delivery's. Several of these processes may run; one at a
time holds the archive lease and works, the others stand by to take over (``services.jobs.archiver``).
SIGTERM or SIGINT ends the pass under way, releases the lease and exits 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import structlog
from prometheus_client import start_http_server

from services.clients import build_clients
from services.jobs.archiver import Archiver, file_root
from services.logging import configure_logging
from services.settings import Settings, get_settings

log = structlog.get_logger(__name__)


def run_archiver(settings: Settings, stop: threading.Event) -> int:
    """Archive until ``stop`` is set; the exit status."""
    clients = build_clients(settings)
    if settings.worker_metrics_port:  # the process collectors only; it answering means the process is up
        start_http_server(settings.worker_metrics_port)
    archiver = Archiver(
        redis=clients.redis,
        archive=clients.archive,
        finished_ttl=settings.finished_ttl,
        sweep_root=file_root(clients.storage),
    )
    log.info("archiver.started", token=archiver.token)
    try:
        archiver.run(stop.is_set)
    finally:
        archiver.stop()  # releases the lease: a standby takes over at once
        clients.close()
    log.info("archiver.stopped")
    return 0


def main() -> int:
    settings = get_settings()
    configure_logging(settings.environment)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return run_archiver(settings, stop)


if __name__ == "__main__":
    sys.exit(main())
