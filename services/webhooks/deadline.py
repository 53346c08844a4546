"""A total deadline for one webhook attempt: connect, TLS, request body and response headers together.

Why: httpx's timeouts bound each phase and each socket read separately, so a receiver that sends one
header byte a second never trips any of them and can hold an attempt (and the slot it runs in) for as
long as it likes. The deadline is enforced where the bytes move — in the network stream httpcore reads
and writes through — so every read and write waits at most the time left, and the first one past the
deadline raises httpcore's own timeout. httpx turns that into ``httpx.ReadTimeout`` (or Connect/Write):
an ordinary transport error, classified as retryable, and the connection is closed the usual way.

The deadline is set per attempt with :func:`attempt_deadline` in the thread that sends the request (httpx
is synchronous here, so the request runs in that thread); connections are never reused between webhook
requests (``Connection: close``, no keep-alive), so each stream belongs to exactly one attempt and takes
the deadline that was current when it was opened. Without a deadline the backend behaves like httpcore's.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

#: (monotonic time the attempt must end by, its length in seconds for messages), or None.
_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("webhook_attempt_deadline", default=None)


@contextmanager
def attempt_deadline(seconds: float | None) -> Iterator[None]:
    """Bound every connection opened in this block (this thread) to ``seconds`` from now, in total."""
    token = _DEADLINE.set(None if seconds is None else (time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


class DeadlineStream(httpcore.NetworkStream):
    """A network stream whose reads and writes never wait past the attempt's deadline."""

    def __init__(self, stream: httpcore.NetworkStream, ends_at: float, length_s: float) -> None:
        self._stream = stream
        self._ends_at = ends_at
        self._length_s = length_s
        self._message = f"attempt deadline of {length_s:g}s exceeded"

    def _bound(self, timeout: float | None, error: type[Exception]) -> tuple[float, bool]:
        """The timeout to use, and whether the deadline (not the phase timeout) is what bounds it."""
        left = self._ends_at - time.monotonic()
        if left <= 0:
            raise error(self._message)
        if timeout is None or left < timeout:
            return left, True
        return timeout, False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        bounded, by_deadline = self._bound(timeout, httpcore.ReadTimeout)
        try:
            return self._stream.read(max_bytes, bounded)
        except httpcore.ReadTimeout as exc:
            if by_deadline:
                raise httpcore.ReadTimeout(self._message) from exc
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        bounded, by_deadline = self._bound(timeout, httpcore.WriteTimeout)
        try:
            self._stream.write(buffer, bounded)
        except httpcore.WriteTimeout as exc:
            if by_deadline:
                raise httpcore.WriteTimeout(self._message) from exc
            raise

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        bounded, by_deadline = self._bound(timeout, httpcore.ConnectTimeout)
        try:
            tls = self._stream.start_tls(ssl_context, server_hostname, bounded)
        except httpcore.ConnectTimeout as exc:
            if by_deadline:
                raise httpcore.ConnectTimeout(self._message) from exc
            raise
        return DeadlineStream(tls, self._ends_at, self._length_s)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, with each new connection bound to the current attempt's deadline."""

    def __init__(self, backend: httpcore.NetworkBackend | None = None) -> None:
        self._backend = backend or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        deadline = _DEADLINE.get()
        if deadline is None:
            return self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        ends_at, length_s = deadline
        left = ends_at - time.monotonic()
        message = f"attempt deadline of {length_s:g}s exceeded"
        if left <= 0:
            raise httpcore.ConnectTimeout(message)
        by_deadline = timeout is None or left < timeout
        try:
            stream = self._backend.connect_tcp(
                host, port, left if by_deadline else timeout, local_address, socket_options
            )
        except httpcore.ConnectTimeout as exc:
            if by_deadline:
                raise httpcore.ConnectTimeout(message) from exc
            raise
        return DeadlineStream(stream, ends_at, length_s)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return self._backend.connect_unix_socket(path, timeout, socket_options)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's transport over :class:`DeadlineBackend`.

    httpx 0.28 takes no network backend, so the connection pool it built is replaced by the same pool
    over our backend (no proxy, no keep-alive: what ``make_webhook_client`` configures anyway).
    """

    def __init__(self, *, verify: ssl.SSLContext | bool, limits: httpx.Limits) -> None:
        super().__init__(verify=verify, trust_env=False, limits=limits)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=DeadlineBackend(),
        )
