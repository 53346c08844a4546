"""A lean HTTP/1.1 load generator on asyncio (uvloop when installed), for loopback load tests.

Why not httpx or locust: on a 2-core machine the load generator shares the cores with the API and Redis it
measures. httpx spends a few hundred microseconds of Python per request, so at 1,000 requests/s it would
take a core away from the server under test. This client writes prebuilt request bytes on keep-alive
connections and parses only the status line, ``Content-Length`` and the body: tens of microseconds per
request. Its own CPU use is measured and reported with every run.

Two shapes of load:
- ``closed_loop``: ``concurrency`` clients, each sending its next request as soon as the last one is
  answered — finds the throughput the server sustains.
- ``open_loop``: requests start on a fixed schedule (``rate`` per second) whatever the server does, and each
  latency is counted from the *scheduled* start, so a stalled server cannot hide its stall by slowing the
  client down (no coordinated omission).

Every run is bounded by a request count and a duration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench.common import summary

T = TypeVar("T")
RequestFactory = Callable[[int], bytes]
_MAX_HEADER_BYTES = 64 * 1024


def build_request(
    method: str, path: str, host: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> bytes:
    """The bytes of one HTTP/1.1 request (keep-alive)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: darkroom-bench"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (body or b"")


class HttpConnection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection(host, port, limit=_MAX_HEADER_BYTES)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, _, header_block = head.partition(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = None
        chunked = False
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            lowered = name.strip().lower()
            if lowered == b"content-length":
                length = int(value.strip())
            elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            body = await self._read_chunked()
        elif length is not None:
            body = await self.reader.readexactly(length)
        else:
            raise ValueError("response without Content-Length or chunked encoding")
        return status, body

    async def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


@dataclass
class LoadResult:
    """What a run saw: per-request latencies (seconds) and status counts."""

    mode: str
    requested: int = 0
    latencies_s: list[float] = field(default_factory=list)  # open loop: from the scheduled start
    service_s: list[float] = field(default_factory=list)  # from the moment the request was written
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    elapsed_s: float = 0.0
    bodies: list[bytes] = field(default_factory=list)
    late_starts: int = 0  # open loop: requests that could not start on schedule (no free connection)

    @property
    def completed(self) -> int:
        return sum(self.statuses.values())

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s else 0.0

    def report(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "requested": self.requested,
            "completed": self.completed,
            "errors": self.errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "elapsed_s": round(self.elapsed_s, 3),
            "throughput_per_s": round(self.throughput, 1),
            "latency_ms": summary(self.latencies_s, 1000.0),
            "service_ms": summary(self.service_s, 1000.0),
            "late_starts": self.late_starts,
        }


async def closed_loop(
    host: str,
    port: int,
    make_request: RequestFactory,
    *,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    keep_bodies: int = 0,
) -> LoadResult:
    """``concurrency`` clients send back to back until ``max_requests`` are sent or ``max_seconds`` pass."""
    result = LoadResult(mode="closed")
    next_index = 0
    started = time.perf_counter()
    deadline = started + max_seconds

    async def client() -> None:
        nonlocal next_index
        connection = await HttpConnection.open(host, port)
        try:
            while next_index < max_requests and time.perf_counter() < deadline:
                index = next_index
                next_index += 1
                raw = make_request(index)
                sent = time.perf_counter()
                try:
                    status, body = await connection.request(raw)
                except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                    result.errors += 1
                    await connection.close()
                    connection = await HttpConnection.open(host, port)
                    continue
                elapsed = time.perf_counter() - sent
                result.latencies_s.append(elapsed)
                result.service_s.append(elapsed)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if len(result.bodies) < keep_bodies:
                    result.bodies.append(body)
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    result.requested = next_index
    return result


async def open_loop(
    host: str,
    port: int,
    make_request: RequestFactory,
    *,
    rate: float,
    duration_s: float,
    max_connections: int = 64,
) -> LoadResult:
    """Start request ``i`` at ``t0 + i / rate`` for ``duration_s``; latency counts from that instant."""
    result = LoadResult(mode="open")
    total = int(rate * duration_s)
    idle: list[HttpConnection] = []
    opened = 0
    slots = asyncio.Semaphore(max_connections)
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int, scheduled: float) -> None:
        nonlocal opened
        if slots.locked():
            result.late_starts += 1
        async with slots:
            connection = idle.pop() if idle else None
            if connection is None:
                connection = await HttpConnection.open(host, port)
                opened += 1
            sent = time.perf_counter()
            try:
                status, _ = await connection.request(make_request(index))
            except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                result.errors += 1
                await connection.close()
                return
            done = time.perf_counter()
            result.latencies_s.append(done - scheduled)
            result.service_s.append(done - sent)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            idle.append(connection)

    started = time.perf_counter()
    for index in range(total):
        scheduled = started + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(index, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=max(10.0, duration_s))
    result.elapsed_s = time.perf_counter() - started
    result.requested = total
    for connection in idle:
        await connection.close()
    return result


def run(main: Callable[[], Coroutine[Any, Any, T]] | Awaitable[T]) -> T:
    """Run a coroutine on uvloop when it is installed (as the API does), else on asyncio's loop."""
    coroutine = main() if callable(main) else main
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coroutine)  # type: ignore[arg-type]
