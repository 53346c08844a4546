"""Following a job's event stream without holding a thread: SSE and ``Prefer: wait``.

Every status change and progress write is appended to the job's Redis stream (see services/jobs.py), so a
reader first replays what it missed and then blocks on XREAD for more — nothing can slip between "read
the state" and "subscribe", and a reconnecting SSE client resumes from ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aredis
import structlog

from api.waits import first
from schemas.jobs import TERMINAL_STATUSES
from services.clients import REDIS_UNAVAILABLE
from services.jobs import decode_event, events_key
from services.jobs.keys import done_key

log = structlog.get_logger(__name__)
#: Longest single XREAD block. Longer waits are several reads, so the async client's socket timeout
#: (``READ_TIMEOUT_S``) can stay short and a Redis that stops answering is noticed within seconds.
_BLOCK_MS = 5_000
READ_TIMEOUT_S = _BLOCK_MS / 1000 + 5.0
_PING_EVERY_S = 15.0
_TERMINAL = {status.value for status in TERMINAL_STATUSES}


def is_terminal_event(event: dict[str, Any]) -> bool:
    return event["type"] == "status" and event["data"].get("status") in _TERMINAL


async def read_events(
    redis: aredis.Redis, job_id: str, last_id: str, block_ms: int | None
) -> list[tuple[str, dict[str, Any]]]:
    """Events after ``last_id``, waiting up to ``block_ms`` for the first one (None: not at all)."""
    reply = await redis.xread({events_key(job_id): last_id}, block=block_ms, count=100)
    if not reply:
        return []
    _, entries = cast(list[Any], reply)[0]
    return [(entry_id.decode(), decode_event(values)) for entry_id, values in entries]


async def wait_until_finished(redis: aredis.Redis, job_id: str, timeout_s: float) -> bool:
    """True as soon as the job reaches a terminal state, False if ``timeout_s`` passes first.

    Reads the job's done stream (``services.jobs.keys.done_key``: one entry, added by the terminal
    transition), not its event stream: a blocking read of the event stream returned for every progress
    event — one round trip a second of a running job — where this one returns once, and at once for a
    job that has already ended. Read-only, like the event stream it replaces (a Redis refusing writes at
    ``maxmemory`` still serves it)."""
    key = done_key(job_id)
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        block_ms = max(1, min(_BLOCK_MS, int(remaining * 1000)))
        if await redis.xread({key: "0-0"}, block=block_ms, count=1):
            return True
    return False


def sse_message(event: str, data: Any, event_id: str | None = None) -> bytes:
    lines = [f"id: {event_id}"] if event_id else []
    lines.append(f"event: {event}")
    lines += [f"data: {line}" for line in json.dumps(data, separators=(",", ":")).splitlines()]
    return ("\n".join(lines) + "\n\n").encode()


async def sse_stream(
    redis: aredis.Redis,
    job_id: str,
    last_id: str,
    final_job: Callable[[], Awaitable[dict[str, Any]]],
    is_disconnected: Callable[[], Awaitable[bool]],
    shutdown: asyncio.Event,
    *,
    archived: Callable[[str], list[tuple[str, dict[str, Any]]]] | None = None,
) -> AsyncIterator[bytes]:
    """``status`` and ``progress`` events as they happen, then one ``job`` event with the final job.

    If Redis becomes unreachable mid-stream, or the server begins to shut down (``shutdown`` is set), the
    stream just ends (the status line went out long ago, so there is no 503 to send): clients reconnect
    with ``Last-Event-ID`` — to another replica — and miss nothing. ``redis`` is the waits' own pool.
    ``archived``: the events after a stream id, for a job that has left Redis (``services.jobs.archive``):
    replayed from there, then the stream ends as for any finished job.
    """
    yield b"retry: 2000\n\n"
    job = await final_job()
    if job["status"] in _TERMINAL:
        # Already over: replay what the client has not seen and close. Waiting for events would hang a
        # client that reconnects after the final status (its Last-Event-ID is the last entry there is).
        try:
            if archived is not None:
                replay = archived(last_id)
            else:
                replay = await read_events(redis, job_id, last_id, block_ms=None)
            for entry_id, event in replay:
                last_id = entry_id
                yield sse_message(event["type"], event["data"], entry_id)
        except REDIS_UNAVAILABLE as exc:
            log.warning("sse stream ended: redis unavailable", job_id=job_id, error=str(exc))
            return
        yield sse_message("job", job, last_id)
        return
    last_ping = time.monotonic()
    while not shutdown.is_set() and not await is_disconnected():
        try:
            read, events = await first(
                read_events(redis, job_id, last_id, block_ms=_BLOCK_MS), shutdown.wait()
            )
        except REDIS_UNAVAILABLE as exc:
            log.warning("sse stream ended: redis unavailable", job_id=job_id, error=str(exc))
            return
        if not read or events is None:
            return  # shutting down
        for entry_id, event in events:
            last_id = entry_id
            yield sse_message(event["type"], event["data"], entry_id)
            if is_terminal_event(event):
                yield sse_message("job", await final_job(), entry_id)
                return
        if time.monotonic() - last_ping >= _PING_EVERY_S:
            yield b": ping\n\n"
            last_ping = time.monotonic()
        await asyncio.sleep(0)
