"""uvicorn's httptools protocol with the limits it lacks before a request reaches the app (issue #16 case 8).

Out of the box a client that has not finished its request head costs what it likes: httptools buffers a
header value of any size (4 unfinished 64 MiB headers took the API from 92 to 373 MB), and nothing times
out a connection that sends its head slowly or never (uvicorn's keep-alive timeout only runs between
requests). :class:`LimitedHttpProtocol` adds, per connection, before authentication and the app:

- a cap on the request head's size (``DARKROOM_HTTP_MAX_HEADER_BYTES``): past it, 431 and close;
- a deadline for the head (``DARKROOM_HTTP_HEADER_TIMEOUT``), from connecting or from a kept-alive
  request's first byte: past it, the connection is closed (408 first if part of a head came);
- a cap on connections still waiting for their first head (``DARKROOM_HTTP_MAX_PENDING_CONNECTIONS``):
  the oldest such connection is closed for a new one, so silent sockets cannot crowd out real clients.

Run as ``uvicorn api.main:app --http api.http_protocol:LimitedHttpProtocol`` (``UVICORN_HTTP`` in the
images). A reverse proxy in front (nginx ``client_header_timeout`` / ``large_client_header_buffers``, an
ingress controller's equivalents) is the usual first line; these limits hold where none is.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from schemas.problems import PROBLEM_CONTENT_TYPE, problem_type
from services.settings import Settings, get_settings


@dataclass(frozen=True)
class HeadLimits:
    max_header_bytes: int
    header_timeout_s: float
    max_pending: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HeadLimits:
        return cls(
            max_header_bytes=settings.http_max_header_bytes,
            header_timeout_s=settings.http_header_timeout.total_seconds(),
            max_pending=settings.http_max_pending_connections,
        )


# Connections of one server (its ``server_state``) still waiting for their first head, oldest first.
_PENDING: weakref.WeakKeyDictionary[Any, dict[LimitedHttpProtocol, None]] = weakref.WeakKeyDictionary()


def _problem_bytes(status: int, reason: str, code: str, detail: str) -> bytes:
    body = json.dumps(
        {"type": problem_type(code), "title": reason, "status": status, "detail": detail, "code": code}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {PROBLEM_CONTENT_TYPE}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class LimitedHttpProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` plus a head size cap, a head deadline and a cap on pending connections."""

    limits: ClassVar[HeadLimits | None] = None
    """Set by tests (a subclass per server); else read from :func:`get_settings` on first use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cls = type(self)
        if cls.limits is None:
            cls.limits = HeadLimits.from_settings(get_settings())
        self._limits = cls.limits
        self._in_head = False
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._first_head = True

    # --- where a head starts and ends --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        pending = _PENDING.setdefault(self.server_state, {})
        pending[self] = None
        while len(pending) > self._limits.max_pending:
            oldest = next(iter(pending))
            oldest._close("pending-connection cap reached")
        self._start_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:  # the next request on a kept-alive connection
            self._start_head()

    def on_headers_complete(self) -> None:
        self._end_head()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)  # whole chunks: the buffer holds at most one past the cap
            if self._head_bytes > self._limits.max_header_bytes:
                self._refuse(
                    431,
                    "Request Header Fields Too Large",
                    "request_header_fields_too_large",
                    f"The request line and headers exceed {self._limits.max_header_bytes} bytes.",
                )

    # --- the limits --------------------------------------------------------------------------------------

    def _start_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._limits.header_timeout_s, self._head_timed_out)

    def _end_head(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._first_head:
            self._first_head = False
            _PENDING.get(self.server_state, {}).pop(self, None)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(
                408,
                "Request Timeout",
                "request_timeout",
                f"The request head did not arrive within {self._limits.header_timeout_s:g} s.",
            )
        else:
            self._close("no request head in time")

    def _refuse(self, status: int, reason: str, code: str, detail: str) -> None:
        self.logger.warning("refused a request head: %s", detail)
        self.transport.write(_problem_bytes(status, reason, code, detail))
        self._close(detail)

    def _close(self, why: str) -> None:
        self._end_head()
        if not self.transport.is_closing():
            self.transport.close()
