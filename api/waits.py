"""Waiting for jobs without starving everyone else: SSE streams, ``Prefer: wait`` and the OpenAI route.

A wait holds a request open and a Redis connection in a blocking XREAD for up to a minute, so three rules
keep one key's waits from hurting anyone else:

- **Per-key share, fleet-wide.** Each wait takes a *lease* in a Redis sorted set per key
  (``darkroom:waits:<key name>``, member = lease id, score = expiry); a key holding
  ``DARKROOM_MAX_WAITS_PER_KEY`` live leases gets 429 ``too_many_waits`` with ``Retry-After``. Counted in
  Redis, not per process, so the share holds whatever the number of replicas and uvicorn workers; the check
  and the take are one script, so concurrent requests cannot both take the last lease. Leases are renewed
  every few seconds by the process holding them and expire ``LEASE_TTL_S`` after the last renewal, so a
  process that dies (SIGKILL, OOM, lost node) gives its key's share back by itself.
- **Waits have a pool of their own.** Blocking reads go through a separate connection pool of
  ``DARKROOM_MAX_WAITS`` connections; the pool that serves GET/POST/``/readyz`` is never used to wait, so it
  cannot run dry however many waits are open. Beyond ``DARKROOM_MAX_WAITS`` waits in one process, a new one
  gets 503 ``server_busy`` with ``Retry-After`` (the pool is never asked for more than it holds).
- **A wait ends when its reason does.** A client that disconnects ends its wait at once (its lease and
  connection go back); so does the process shutting down: :func:`watch_shutdown` chains onto uvicorn's
  SIGTERM/SIGINT handlers and sets ``Waits.shutdown``, and every wait answers with what it has — a
  ``Prefer: wait`` submission its 202 with the admitted job and its ``Location`` — well within uvicorn's
  graceful shutdown, instead of being cut after it.

A single reader per process fanning events out to its waiters would need fewer connections still; the
separate bounded pool is the simpler way to the same guarantee (waits never touch the shared pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import redis.asyncio as aredis
import structlog
from redis.asyncio.client import Pipeline
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import ApiError, ServiceUnavailable
from api.riders import Rider

log = structlog.get_logger(__name__)
T = TypeVar("T")

LEASE_PREFIX = "darkroom:waits:"
#: A lease lives this long after its last renewal: how long a dead process's waits still count.
LEASE_TTL_S = 30.0
RENEW_EVERY_S = LEASE_TTL_S / 3
#: Retry-After for a key over its share: waits last seconds to a minute, so a few seconds.
TOO_MANY_WAITS_RETRY_AFTER_S = 5
SERVER_BUSY_RETRY_AFTER_S = 2

# KEYS[1] the key's lease set; ARGV: limit, lease id, ttl ms. Expired leases (a dead process's) go first.
_ACQUIRE_LUA = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
# KEYS[1] a lease set; ARGV: ttl ms, then the lease ids this process holds there (only live ones renewed).
_RENEW_LUA = """
local now = redis.call('TIME')
local expiry = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


class TooManyWaits(ApiError):
    """429: the key already holds its share of open waits (SSE streams, ``Prefer: wait``, OpenAI calls)."""

    status = 429
    code = "too_many_waits"
    title = "Too Many Requests"


def lease_key(principal: str) -> str:
    return LEASE_PREFIX + principal


@dataclass(frozen=True)
class Lease:
    principal: str
    id: str


@dataclass
class Waits:
    """The process's waits: leases, the pool they read on, and the shutdown signal. Made in the lifespan."""

    redis: aredis.Redis  # the shared pool: lease bookkeeping (one short script per wait)
    blocking: aredis.Redis  # the waits' own pool, ``per_process`` connections: every blocking read
    per_key: int  # 0: no per-key limit
    per_process: int
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    _held: dict[Lease, None] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)
    _process: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    _renewer: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self._acquire = self.redis.register_script(_ACQUIRE_LUA)
        self._renew = self.redis.register_script(_RENEW_LUA)

    @property
    def held(self) -> int:
        return len(self._held)

    async def acquire(self, principal: str) -> Lease:
        """A lease for one wait of ``principal``: 429 ``too_many_waits`` over its share, 503 ``server_busy``
        when this process holds all the waits it may."""
        if len(self._held) >= self.per_process:
            raise ServiceUnavailable(
                f"this server holds {self.per_process} open waits (SSE streams, 'Prefer: wait', OpenAI image "
                "calls); retry shortly, or poll GET /v1/generations/{id} instead",
                code="server_busy",
                retry_after=SERVER_BUSY_RETRY_AFTER_S,
            )
        lease = Lease(principal, f"{self._process}:{next(self._ids)}")
        self._held[lease] = None  # counted before the await: concurrent requests see it
        try:
            if self.per_key and not await self._acquire(
                keys=[lease_key(principal)], args=[self.per_key, lease.id, int(LEASE_TTL_S * 1000)]
            ):
                raise TooManyWaits(
                    f"this API key already holds {self.per_key} open waits (SSE streams, 'Prefer: wait' "
                    "submissions and OpenAI image calls together); close one, or poll "
                    "GET /v1/generations/{id} instead",
                    headers={"Retry-After": str(TOO_MANY_WAITS_RETRY_AFTER_S)},
                )
        except BaseException:
            self._held.pop(lease, None)
            raise
        return lease

    async def release(self, lease: Lease) -> None:
        """Give ``lease`` back; idempotent. A Redis that does not answer leaves the lease to expire."""
        if self._held.pop(lease, "gone") == "gone":
            return
        if not self.per_key:
            return
        try:
            await self.redis.zrem(lease_key(lease.principal), lease.id)
        except Exception as exc:  # noqa: BLE001 - expiry frees it; the request's answer must not change
            _not_released(lease, exc)

    def release_riders(self, lease: Lease) -> tuple[Rider, ...]:
        """:meth:`release` as a rider (``api.riders``) of the read that ends a wait: the lease goes back in
        that read's round trip. Until the read's reply has come, the lease counts as held, so a read that
        fails or is cancelled leaves it to :meth:`hold`'s own release. None without a per-key limit (the
        lease is then only this process's count, given back by :meth:`hold`)."""
        return (_Release(self, lease),) if self.per_key and lease in self._held else ()

    @contextlib.asynccontextmanager
    async def hold(self, principal: str) -> AsyncIterator[Lease]:
        lease = await self.acquire(principal)
        try:
            yield lease
        finally:
            await asyncio.shield(self.release(lease))

    async def until(self, work: Awaitable[T], *stops: Awaitable[Any]) -> tuple[bool, T | None]:
        """:func:`first` of ``work``, ``stops`` and this process's shutdown.

        ``work`` that fails once the shutdown has been signalled counts as stopped, ``(False, None)``: its
        read may fail because the server is stopping, and the wait then answers with what it has, as any
        wait cut by the shutdown does (a ``Prefer: wait`` its 202 with the admitted job), not with an error.
        """
        try:
            return await first(work, *stops, self.shutdown.wait())
        except Exception as exc:
            if not self.shutdown.is_set():
                raise
            log.info("wait failed while the server stops; answered as stopped", error=repr(exc))
            return False, None

    # --- renewal ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.per_key:
            self._renewer = asyncio.create_task(self._renew_forever(), name="darkroom-wait-leases")

    async def stop(self) -> None:
        self.shutdown.set()
        if self._renewer is not None:  # cancelled as a wait's read is: it may swallow one cancellation
            await cancel_and_wait([self._renewer])

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                await self.renew()
            except Exception as exc:  # noqa: BLE001 - Redis down: the next round tries again
                log.warning("wait leases not renewed", error=str(exc))

    async def renew(self) -> None:
        """Push back the expiry of every lease this process holds (one script per key)."""
        by_key: dict[str, list[str]] = {}
        for lease in list(self._held):
            by_key.setdefault(lease_key(lease.principal), []).append(lease.id)
        for key, ids in by_key.items():
            await self._renew(keys=[key], args=[int(LEASE_TTL_S * 1000), *ids])


@dataclass(frozen=True)
class _Release:
    waits: Waits
    lease: Lease

    def send(self, pipe: Pipeline) -> None:
        pipe.zrem(lease_key(self.lease.principal), self.lease.id)

    async def settle(self, reply: Any) -> None:
        self.waits._held.pop(self.lease, None)  # given back: hold()'s release finds nothing left to do
        if isinstance(reply, Exception):  # as in release(): expiry frees it; the answer must not change
            _not_released(self.lease, reply)


def _not_released(lease: Lease, error: Exception) -> None:
    log.warning("wait lease not released; it expires", error=str(error), principal=lease.principal)


# --- ending waits early ---------------------------------------------------------------------------------


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone. Only for requests whose body has been read (the server then
    answers ``receive`` with nothing but ``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def first(work: Awaitable[T], *stops: Awaitable[Any]) -> tuple[bool, T | None]:
    """Run ``work`` until it finishes or any of ``stops`` does; ``(True, result)`` or ``(False, None)``.

    Whatever is left is cancelled and awaited before returning (:func:`cancel_and_wait`), so a Redis
    connection a cancelled read held is back in its pool by then. ``work``'s exception, if it raised, is
    raised here.
    """
    task = asyncio.ensure_future(work)
    others = [asyncio.ensure_future(stop) for stop in stops]
    try:
        await asyncio.wait([task, *others], return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait([task, *others])
    if not task.cancelled():
        return True, task.result()  # finished first (or with a stop): its result, or its exception
    return False, None


#: A cancelled task still running this long after its cancellation is cancelled again.
RECANCEL_AFTER_S = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and return once every one has ended, cancelling again any that outlives its
    cancellation by :data:`RECANCEL_AFTER_S`.

    On Python 3.11 a task can swallow a cancellation: ``asyncio.wait_for``, which redis-py wraps around
    sending every command, returns the send's result when the cancellation lands in the instant the send
    completes (gh-86296, fixed in 3.12). A wait's read cancelled in that instant went on to block in
    XREAD, and its request with it: a ``Prefer: wait`` ended by SIGTERM as it began was held until
    uvicorn's graceful timeout and answered with uvicorn's bare text/plain 500. Cancelled again, the read
    is cut where it blocks, and redis-py drops its connection as it does for any cancelled command.
    """
    pending = {t for t in tasks if not t.done()}
    try:
        while pending:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=RECANCEL_AFTER_S)
    except asyncio.CancelledError:  # we are cancelled ourselves: what is left is cancelled once more
        for t in pending:
            t.cancel()
        raise


class LeasedStreamingResponse(StreamingResponse):
    """A streaming response that gives its wait lease back however the stream ends (finished, client
    gone, server shutting down, or never started)."""

    def __init__(self, content: Any, release: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._release())


# --- the shutdown signal --------------------------------------------------------------------------------


@contextlib.contextmanager
def watch_shutdown(event: asyncio.Event) -> Iterator[None]:
    """Set ``event`` as soon as the process is asked to stop (SIGTERM, SIGINT), then let the handler that
    was there (uvicorn's: stop accepting, wait for requests up to its graceful timeout) do its work.

    uvicorn runs the lifespan shutdown only after in-flight requests end, too late to tell waits to end;
    its signal handler is the first moment the process knows. Only from the main thread (where uvicorn
    itself installs handlers); elsewhere, e.g. uvicorn in a test's thread, nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(event.set)
        chained = previous.get(signum)
        if callable(chained):
            chained(signum, frame)
        elif chained == signal.SIG_DFL:  # nobody else handles it: behave as if we were not here
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for signum, chained in previous.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, chained)
