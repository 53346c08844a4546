"""API test helpers: ``serve`` runs an ASGI app under real uvicorn on a kernel-chosen loopback port;
``capture_json_logs`` collects the JSON log lines the app writes meanwhile.

Why real uvicorn rather than ``TestClient``: request ids, content types, ``Allow``/``Retry-After`` headers,
chunked bodies and ``Connection: close`` only mean something as bytes on a socket, and the contextvars a
middleware binds must survive uvicorn's task-per-request model, not the test client's portal.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
import uvicorn
from starlette.types import ASGIApp

from services.logging import configure_logging

LOOPBACK = "127.0.0.1"


@contextmanager
def serve(app: ASGIApp, lifespan: str = "off") -> Iterator[str]:
    """Serve ``app`` in a background thread for the ``with`` block; yields its base URL.

    The listening socket is bound and put in listen mode *before* uvicorn starts, so the first request
    simply waits in the kernel's accept queue until the server is up: no polling, no sleeps. uvicorn's
    own logging config is off (``log_config=None``) so it cannot reconfigure logging for other tests.
    ``lifespan="on"`` for apps from ``api.main.create_app`` (their clients are made in the lifespan).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan=lifespan, timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class LogCapture:
    """JSON log lines written since the capture started (or since the last ``mark``)."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self._offset = 0

    def mark(self) -> None:
        self._offset = len(self.buffer.getvalue())

    def lines(self) -> list[dict[str, Any]]:
        text = self.buffer.getvalue()[self._offset :]
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@contextmanager
def capture_json_logs(level: str = "DEBUG") -> Iterator[LogCapture]:
    """Configure production (JSON) logging into a buffer; restore the previous logging setup after.

    Restoring matters: ``configure_logging`` changes process-wide state (root handler and level,
    uvicorn's loggers, structlog's configuration) that later tests must not inherit.
    """
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    foreign = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    saved_foreign = [(lg.handlers[:], lg.propagate, lg.level) for lg in foreign]
    saved_structlog = structlog.get_config()
    capture = LogCapture()
    configure_logging("production", level, stream=capture.buffer)
    added = [handler for handler in root.handlers if handler not in saved_root[0]]
    try:
        yield capture
    finally:
        for handler in added:
            root.removeHandler(handler)
        root.setLevel(saved_root[1])
        for lg, (handlers, propagate, level_) in zip(foreign, saved_foreign, strict=True):
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level_)
        structlog.configure(**saved_structlog)
