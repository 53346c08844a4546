"""Many loopback webhook receivers in one asyncio loop, fast enough to never be what a rate bench measures.

Why not ``tests/fixtures/http_receiver`` (a thread per connection) for a rate benchmark: at 150 ms per
answer and 500+ requests a second it would hold 75+ threads and spend the CPU the webhook process needs.
Here each port is one receiver (one "host" to the webhook process's per-host share): ``ok`` ports read
the request, wait ``delay_s`` on a timer and answer ``204`` then close; ``hang`` ports read the request
and never answer. The loop runs in a thread of its own; counters are read from any thread.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from types import TracebackType
from typing import Literal

LOOPBACK = "127.0.0.1"
_RESPONSE = b"HTTP/1.1 204 No Content\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class _Receiver(asyncio.Protocol):
    """One connection: buffer until the whole request (headers + Content-Length body) is in."""

    def __init__(self, owner: RateReceivers, mode: Literal["ok", "hang"]) -> None:
        self.owner = owner
        self.mode = mode
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if len(body) < length:
            return
        self.done = True
        self.owner._arrived(self.mode)
        if self.mode == "ok":
            asyncio.get_running_loop().call_later(self.owner.delay_s, self._answer)

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_RESPONSE)
            self.transport.close()
            self.owner._answered()


class RateReceivers:
    """``ok`` receivers on ``ok_ports`` free ports and ``hang`` receivers on ``hang_ports``."""

    def __init__(self, ok_ports: int, *, hang_ports: int = 0, delay_s: float = 0.15) -> None:
        self.delay_s = delay_s
        ok: list[Literal["ok", "hang"]] = ["ok"]
        hang: list[Literal["ok", "hang"]] = ["hang"]
        self._modes = ok * ok_ports + hang * hang_ports
        self.ok_urls: list[str] = []
        self.hang_urls: list[str] = []
        self.answered_at: list[float] = []  # monotonic time of each ok answer, in order
        self.arrived = {"ok": 0, "hang": 0}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rate-receivers", daemon=True)
        self._servers: list[asyncio.Server] = []

    def _arrived(self, mode: str) -> None:
        with self._lock:
            self.arrived[mode] += 1

    def _answered(self) -> None:
        with self._lock:
            self.answered_at.append(time.monotonic())

    @property
    def answered(self) -> int:
        with self._lock:
            return len(self.answered_at)

    async def _serve(self) -> None:
        for mode in self._modes:
            server = await self._loop.create_server(
                functools.partial(_Receiver, self, mode), LOOPBACK, 0, backlog=4096
            )
            self._servers.append(server)
            port = server.sockets[0].getsockname()[1]
            (self.ok_urls if mode == "ok" else self.hang_urls).append(f"http://{LOOPBACK}:{port}/hook")

    def start(self) -> RateReceivers:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                server.close()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> RateReceivers:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
