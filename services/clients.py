"""The long-lived clients a darkroom process talks to the world through: Redis, the job store, storage,
and the outbound webhook HTTP client.

Why one small container instead of module globals: nothing may connect at import time (tests, the API
factory and forking RQ workers all import modules long before they should touch the network), and every
process — API lifespan, GPU worker, webhook worker — needs the same set built the same way from
``Settings``. Each client is created on first use, so a process only opens what it actually uses (the API
never needs the webhook client, the webhook worker never uploads), and ``close()`` releases exactly what
was opened.

``process_clients()`` is the per-process instance for code that RQ calls by dotted path (tasks cannot be
handed arguments other than their JSON job arguments). It is rebuilt after a fork, because sockets
inherited from a parent must not be shared with it.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import httpx
import redis.asyncio as aredis
import redis.exceptions
import structlog
from redis import Redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from services.jobs.archive import JobArchive
from services.jobs.lifecycle import Lifecycle
from services.jobs.store import JobStore
from services.redis_connect import SentinelTarget, is_sentinel_url, parse_sentinel_url
from services.replication import ReplicaAcks
from services.settings import Settings, get_settings
from services.storage import FileStorage, RetryPolicy, Storage, storage_from_url
from services.webhooks.delivery import make_webhook_client

#: Where processes without ``DARKROOM_URL_SIGNING_KEY`` agree on one (see ``shared_url_signing_key``).
URL_SIGNING_KEY = "darkroom:url-signing-key"
#: Base of ``file://`` download URLs when ``DARKROOM_PUBLIC_URL`` is unset and no request says better: in
#: webhook payloads (the webhook process has no request to read it from). uvicorn's and ``make run``'s
#: default address. The API builds the URLs it answers with from the request's own base URL instead.
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"
#: Route under which the API serves ``file://`` objects; the storage appends the object key.
FILES_PATH = "/v1/files/"

#: Redis clients fail fast: a stopped Redis refuses at once, but an unreachable host would otherwise hold a
#: request (or a worker) for the OS's TCP timeouts. The API turns the error into 503 ``redis_unavailable``.
REDIS_CONNECT_TIMEOUT_S = 2.0
#: Ordinary commands answer in milliseconds; RQ's blocking dequeue uses a client of its own (see workers).
REDIS_SOCKET_TIMEOUT_S = 5.0
#: "Redis cannot be reached right now" (down, restarting, loading its AOF, too slow), as opposed to a bug.
#: Redis at ``maxmemory`` under ``noeviction`` refuses writes (``-OOM``) but still answers reads: transient
#: too — memory comes back as jobs expire or an operator raises the limit — so workers wait it out like a
#: restart, and the API answers 503 ``redis_out_of_memory``. Scripts' refusals are translated to this class
#: by the clients ``make_redis`` builds (see :func:`out_of_memory`).
#: A failover is the same to us: Sentinel has no primary to name yet (``MasterNotFoundError``, a
#: ``ConnectionError``), or a connection still reaches the demoted primary (``READONLY``; our clients then
#: drop that connection, so the next command reconnects to wherever the address now leads), or too few
#: replicas acknowledged a write in time (``services.replication.NotReplicated``, a ``TimeoutError``).
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # BusyLoadingError (still loading the AOF) is a subclass
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)

#: What Redis says when ``maxmemory`` is reached under ``noeviction``: as the reply itself (``-OOM ...``,
#: which redis-py raises as ``OutOfMemoryError``) or, from a Lua script, inside its error (Redis 6 wraps
#: it as ``ERR Error running script ... -OOM command not allowed ...``, a plain ``ResponseError``).
OOM_MESSAGE = "command not allowed when used memory > 'maxmemory'"

T = TypeVar("T")
log = structlog.get_logger(__name__)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a write at ``maxmemory`` (directly, or from inside a script)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.exceptions.ResponseError) and OOM_MESSAGE in str(exc)
    )


def _raise_out_of_memory(exc: redis.exceptions.ResponseError) -> None:
    """A script's ``-OOM`` refusal (Redis 6 reports it as a script error) as ``OutOfMemoryError``."""
    if not isinstance(exc, redis.exceptions.OutOfMemoryError) and out_of_memory(exc):
        raise redis.exceptions.OutOfMemoryError(str(exc)) from exc


class _Redis(Redis):
    """``Redis`` whose scripts' ``-OOM`` refusals raise ``OutOfMemoryError`` like any other command's, so
    ``except REDIS_UNAVAILABLE`` sees every one of them (Redis 6 reports it as a script error).

    A ``READONLY`` reply (a ``redis://`` name that moved to a new primary, a primary demoted under us)
    also drops its connection, so that the next command connects anew instead of asking the replica again.
    """

    def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        try:
            return super().parse_response(connection, command_name, **options)
        except redis.exceptions.ResponseError as exc:
            if isinstance(exc, redis.exceptions.ReadOnlyError):
                connection.disconnect()
            _raise_out_of_memory(exc)
            raise


class _AsyncRedis(aredis.Redis):
    """The asyncio twin of :class:`_Redis`, for the API; its pipelines answer as its commands do."""

    async def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        try:
            return await super().parse_response(connection, command_name, **options)
        except redis.exceptions.ResponseError as exc:
            if isinstance(exc, redis.exceptions.ReadOnlyError):
                await connection.disconnect()
            _raise_out_of_memory(exc)
            raise

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> aredis.client.Pipeline:
        return _AsyncPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class _AsyncPipeline(aredis.client.Pipeline):
    """A pipeline of :class:`_AsyncRedis`: a script's ``-OOM`` is ``OutOfMemoryError``, and a ``READONLY``
    reply drops the connection — once the pipeline's other replies are read, as it goes back to the pool
    (dropped at once, the replies still due could not be read)."""

    _read_only = False

    async def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        try:
            return await super().parse_response(connection, command_name, **options)
        except redis.exceptions.ResponseError as exc:
            if isinstance(exc, redis.exceptions.ReadOnlyError):
                self._read_only = True
            _raise_out_of_memory(exc)
            raise

    async def reset(self) -> None:  # type: ignore[override]  # redis-py's Pipeline.reset, not RESET
        if self._read_only and self.connection is not None:
            await self.connection.disconnect()
        self._read_only = False
        await super().reset()


def _sentinel_kwargs(target: SentinelTarget, *, async_client: bool) -> dict[str, Any]:
    """How to reach each Sentinel: short timeouts and no retry of our own. redis-py asks the Sentinels
    one after the other; its default retry (three times, with seconds of backoff) would make one dead or
    misconfigured Sentinel cost ~7 s before the next is asked, on every new connection."""
    no_retry = AsyncRetry(NoBackoff(), 0) if async_client else Retry(NoBackoff(), 0)
    kwargs = target.sentinel_kwargs(
        connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_timeout=REDIS_SOCKET_TIMEOUT_S
    )
    return {**kwargs, "retry": no_retry}


def make_redis(url: str, *, socket_timeout: float | None = REDIS_SOCKET_TIMEOUT_S) -> Redis:
    """A sync, bytes-mode Redis client with explicit timeouts; ``url`` may name a Sentinel-managed primary
    (``services.redis_connect``).

    One quick retry on a connection error: after a Redis restart every pooled connection is dead, and the
    retry reconnects instead of failing the first command on each of them. Commands we send are safe to
    repeat (the job-status script checks the current status first, so a repeated transition is refused).
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
        "socket_timeout": socket_timeout,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
    }
    if not is_sentinel_url(url):
        return _Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel = Sentinel(
        target.sentinels,
        sentinel_kwargs=_sentinel_kwargs(target, async_client=False),
        **target.node_kwargs(),
    )
    return cast(Redis, sentinel.master_for(target.service_name, redis_class=_Redis, **options))


def make_async_redis(
    url: str, *, socket_timeout: float, max_connections: int | None = None, blocking: bool = False
) -> aredis.Redis:
    """The API's asyncio client, built as :func:`make_redis` builds the workers' (Sentinel URLs too).

    ``blocking``: a pool of ``max_connections`` whose callers wait for a free connection instead of failing
    (the API's waits). Sentinel's pool has no blocking flavour; there the pool is capped all the same, and
    the waits it serves are capped at the same number by ``api.waits``, so none is refused.
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
        "socket_timeout": socket_timeout,
        "health_check_interval": 30,
    }
    if max_connections is not None:
        options["max_connections"] = max_connections
    if is_sentinel_url(url):
        target = parse_sentinel_url(url)
        sentinel = AsyncSentinel(
            target.sentinels,
            sentinel_kwargs=_sentinel_kwargs(target, async_client=True),
            **target.node_kwargs(),
        )
        client = sentinel.master_for(target.service_name, redis_class=_AsyncRedis, **options)
        return cast(aredis.Redis, client)
    if blocking:
        # from_pool: the client owns the pool, so aclose() closes it.
        pool = aredis.BlockingConnectionPool.from_url(url, timeout=REDIS_CONNECT_TIMEOUT_S, **options)
        return _AsyncRedis.from_pool(pool)
    return _AsyncRedis.from_url(url, **options)


def retry_while_redis_down(
    operation: Callable[[], T],
    *,
    what: str,
    deadline_s: float = math.inf,
    should_stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    jitter: Callable[[], float] = random.random,
) -> T:
    """Run ``operation``, retrying while Redis is unreachable or refuses writes at ``maxmemory`` (backoff
    0.25 s doubling to 2 s, each wait jittered down by up to half), for workers.

    Gives up, re-raising the last error, once ``deadline_s`` has passed or ``should_stop()`` says so (a
    worker asked to shut down must not wait for Redis forever). Other errors propagate at once.
    """
    deadline = clock() + deadline_s
    delay = 0.25
    while True:
        try:
            return operation()
        except REDIS_UNAVAILABLE as exc:
            remaining = deadline - clock()
            if remaining <= 0 or should_stop():
                raise
            log.warning("redis.unavailable", operation=what, retry_in_s=delay, error=str(exc))
            # Jittered (half to all of the delay): workers refused together do not come back in step.
            sleep(min(delay * (0.5 + 0.5 * jitter()), remaining))
            delay = min(delay * 2, 2.0)


def shared_url_signing_key(redis: Redis, settings: Settings) -> bytes:
    """The HMAC key for ``file://`` download URLs, identical in every process.

    Why: the GPU and webhook workers sign URLs that the API later verifies, so all of them must hold the
    same key. An operator-set ``DARKROOM_URL_SIGNING_KEY`` wins; otherwise the first process to ask stores a
    random key in Redis (``SET NX``: concurrent starters cannot each mint their own) and everyone reads that
    one back. The key is not given an expiry: losing it only invalidates outstanding URLs, which expire
    within ``url_expiry`` anyway, but a process that cached the old key keeps signing with it until it
    restarts — production deployments should set the variable.
    """
    if settings.url_signing_key is not None:
        return settings.url_signing_key.get_secret_value().encode()
    existing = redis.get(URL_SIGNING_KEY)  # read first: a Redis at maxmemory refuses even a SET NX
    if existing:
        return cast(bytes, existing)
    redis.set(URL_SIGNING_KEY, secrets.token_hex(32), nx=True)
    key = redis.get(URL_SIGNING_KEY)
    if not key:  # deleted between SET and GET (a FLUSHALL): one more round settles it
        redis.set(URL_SIGNING_KEY, secrets.token_hex(32), nx=True)
        key = redis.get(URL_SIGNING_KEY)
    if not key:
        raise RuntimeError(f"could not store or read the URL signing key at {URL_SIGNING_KEY!r} in Redis")
    return cast(bytes, key)


def public_files_url(settings: Settings) -> str:
    """Absolute base URL for ``file://`` objects, as clients (and webhook receivers) must fetch them."""
    return (settings.public_url or DEFAULT_PUBLIC_URL).rstrip("/") + FILES_PATH


class ServiceClients:
    """Lazily built clients for one process. Thread-safe: each client is created once, under a lock.

    ``storage_retry`` wraps the store in ``RetryingStorage`` (the GPU worker wants its uploads and init-image
    reads to ride out outages; the API wants to answer fast).
    """

    def __init__(self, settings: Settings, *, storage_retry: RetryPolicy | None = None) -> None:
        self.settings = settings
        self._storage_retry = storage_retry
        self._lock = threading.RLock()  # re-entrant: building the storage needs the Redis client
        self._built: dict[str, Any] = {}
        self._closed = False

    def _get(self, name: str, factory: Callable[[], T]) -> T:
        with self._lock:
            if self._closed:
                raise RuntimeError("these service clients are closed")
            if name not in self._built:
                self._built[name] = factory()
            return cast(T, self._built[name])

    @property
    def redis(self) -> Redis:
        """Sync, bytes-mode client (like RQ's own connection), so it can be handed to RQ as is."""
        return self._get("redis", lambda: make_redis(self.settings.redis_url))

    @property
    def store(self) -> JobStore:
        return self._get("store", lambda: JobStore(self.redis, self.settings.job_retention))

    @property
    def archive(self) -> JobArchive:
        """Finished jobs and batches once they have left Redis (``services.jobs.archive``)."""
        return self._get("archive", lambda: JobArchive(self.storage, self.settings.job_retention))

    @property
    def lifecycle(self) -> Lifecycle:
        """Every status change of a job goes through it (``services.jobs.lifecycle``)."""
        return self._get(
            "lifecycle",
            lambda: Lifecycle(
                self.redis, self.settings.job_retention, acks=ReplicaAcks.from_settings(self.settings)
            ),
        )

    @property
    def storage(self) -> Storage:
        return self._get("storage", self._build_storage)

    def storage_for(self, request_base_url: str) -> Storage:
        """The storage to sign an API answer's URLs with: ``file://`` URLs start at the request's base URL
        (``http://host:port/root_path/``, as the client reached us) when ``DARKROOM_PUBLIC_URL`` is unset,
        so they work whatever address or port the API listens on. Otherwise the process's storage."""
        storage = self.storage
        if self.settings.public_url or not isinstance(storage, FileStorage):
            return storage
        return storage.with_public_base_url(request_base_url.rstrip("/") + FILES_PATH)

    @property
    def webhook_client(self) -> httpx.Client:
        """The only httpx client allowed to call receivers (no redirects, no env proxies, pinned IPs)."""
        return self._get(
            "webhook_client", lambda: make_webhook_client(self.settings.webhook_timeout.total_seconds())
        )

    def _build_storage(self) -> Storage:
        s = self.settings
        is_file = s.storage_url.startswith("file:")
        return storage_from_url(
            s.storage_url,
            s3_endpoint_url=s.s3_endpoint_url,
            s3_public_endpoint_url=s.s3_public_endpoint_url,
            s3_region=s.s3_region,
            public_base_url=public_files_url(s) if is_file else None,
            # Only file:// URLs are signed by us; asking Redis otherwise would add a needless dependency.
            file_signing_key=shared_url_signing_key(self.redis, s) if is_file else None,
            put_retry=self._storage_retry,
        )

    def close(self) -> None:
        """Release whatever was opened, newest first; idempotent. Errors in one do not skip the others."""
        with self._lock:
            self._closed = True
            built, self._built = self._built, {}
        errors: list[BaseException] = []
        for name in ("webhook_client", "storage", "redis"):  # the store and lifecycle borrow Redis
            client = built.get(name)
            if client is None:
                continue
            try:
                client.close()
            except Exception as exc:  # keep closing the rest, report the first
                errors.append(exc)
        if errors:
            raise errors[0]


def build_clients(settings: Settings, *, storage_retry: RetryPolicy | None = None) -> ServiceClients:
    """Clients for ``settings``; nothing connects until a client is first used."""
    return ServiceClients(settings, storage_retry=storage_retry)


_process_lock = threading.Lock()
_process: tuple[int, ServiceClients] | None = None


def process_clients() -> ServiceClients:
    """This process's clients, built from ``get_settings()`` on first call (and again after a fork)."""
    global _process
    with _process_lock:
        if _process is None or _process[0] != os.getpid():
            _process = (os.getpid(), build_clients(get_settings()))
        return _process[1]


def set_process_clients(clients: ServiceClients) -> None:
    """Make ``clients`` this process's instance (an entrypoint that built them itself, or a test)."""
    global _process
    with _process_lock:
        _process = (os.getpid(), clients)


def close_process_clients() -> None:
    """Close and forget this process's clients, if any were built here; for shutdown."""
    global _process
    with _process_lock:
        current, _process = _process, None
    if current is not None and current[0] == os.getpid():
        current[1].close()
