"""The whole service as real processes, for tests and benchmarks: a private Redis, the API under uvicorn, a
GPU worker on the offline tiny model and the webhook worker, on free loopback ports.

One launcher serves both: tests run it in development mode (readable logs, auth off unless they set keys),
benchmarks in production mode (JSON logs, uvloop + httptools, several uvicorn workers, hashed API keys).

Sharing: each GPU worker imports torch and loads the model (seconds), so stacks that differ only in what
the API reads (keys, rate limits, queue ceilings, the models list, the blocklist, the public URL) should
share one. Start the expensive part once, without an API (``Stack(tmp, api=False)``), then give each
user its own API in front of it (``Stack(tmp2, env=api_settings, backend=shared)``): that stack borrows
the backend's Redis, workers and storage, and closing it stops only its API. The backend's webhook worker
has no public URL of its own, so ``file://`` image URLs *inside webhook payloads* point at the default
address (images read through any API are signed for that API, as always).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import redis

from devtools.net import LOOPBACK, free_port
from devtools.redis_server import RedisServer
from services.api_keys import hash_key
from services.clients import make_redis

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 120.0
#: The tiny model's queues (``DARKROOM_MODEL=tiny`` serves it under the name "tiny") and RQ's set of the
#: workers listening on the first, as RQ names them in Redis.
TINY_QUEUE = "rq:queue:darkroom:tiny"
TINY_BATCH_QUEUE = "rq:queue:darkroom-batch:tiny"
TINY_WORKERS = "rq:workers:darkroom:tiny"
#: Signs the webhooks of every stack unless its ``env`` says otherwise; receivers in tests verify with it.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"darkroom-test-webhook-secret-32b").decode()


#: uvicorn's HTTP protocol in production: httptools plus a cap on request heads, a deadline for them and a
#: cap on connections that have not sent one (``api/http_protocol.py``). Dockerfile.api sets ``UVICORN_HTTP``.
HTTP_PROTOCOL = "api.http_protocol:LimitedHttpProtocol"
#: uvicorn's own limits as the images set them (``UVICORN_*`` in Dockerfile.api; docs/operate/deploy.md):
#: idle kept-alive connections closed after 5 s, at most 1024 connections per process (beyond: 503), the
#: kernel's accept queue, and h11's head cap for anyone who switches ``--http`` to h11.
PRODUCTION_LIMITS = {
    "timeout-keep-alive": "5",
    "limit-concurrency": "1024",
    "backlog": "2048",
    "h11-max-incomplete-event-size": "32768",
}


def uvicorn_command(port: int, *, workers: int = 1, production: bool = False) -> list[str]:
    """``uvicorn api.main:app`` on loopback; in production mode as Dockerfile.api runs it: loop pinned, the
    httptools parser with our limits on request heads (``api.http_protocol``), the connection limits of
    ``PRODUCTION_LIMITS``, uvicorn's access log off (the app writes its own line), ``workers`` processes."""
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", LOOPBACK, "--port", str(port)]
    if not production:
        return command
    if importlib.util.find_spec("uvloop") is not None:
        command += ["--loop", "uvloop"]
    if importlib.util.find_spec("httptools") is not None:
        command += ["--http", HTTP_PROTOCOL]
    for option, value in PRODUCTION_LIMITS.items():
        command += [f"--{option}", value]
    return [*command, "--no-access-log", "--workers", str(workers)]


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM (a worker's warm shutdown), bounded; SIGKILL if it does not go. Returns the exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return process.returncode


def stop_processes(
    processes: Mapping[str, subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT_S
) -> list[str]:
    """SIGTERM every process at once, so their shutdowns overlap, then wait for them all until one shared
    deadline and SIGKILL any still running. Returns the names of those that had to be killed."""
    for process in processes.values():
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = []
    for name, process in processes.items():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed.append(name)
            process.kill()
            process.wait(timeout=5)
    return killed


def hashed_keys(api_keys: Mapping[str, str]) -> str:
    """``DARKROOM_API_KEYS`` for ``{name: token}``: what ``python -m services.api_keys`` prints, joined."""
    return ",".join(f"{name}:sha256:{hash_key(token)}" for name, token in api_keys.items())


class Stack:
    """Start with ``with Stack(tmp, ...) as stack:`` (or ``start()`` / ``close()``); every process it
    started is stopped on exit, Redis last.

    ``env`` is laid over the launcher's defaults for every process and ``process_env[name]`` over that for
    one process ("api", "worker", "webhooks"). ``storage_url`` defaults to a folder under ``tmp``.
    ``api_keys`` (``{name: token}``) turns authentication on with those keys; without them it is off.
    With ``backend`` the stack runs only its API, in front of that stack's Redis, workers and storage.
    ``redis_url``: a Redis someone else runs (a ``redis+sentinel://`` URL, ``devtools.redis_ha``); the
    stack then starts none and stops none.
    """

    def __init__(
        self,
        tmp: Path,
        *,
        env: Mapping[str, str] | None = None,
        process_env: Mapping[str, Mapping[str, str]] | None = None,
        storage_url: str | None = None,
        production: bool = False,
        api: bool = True,
        api_workers: int = 1,
        worker: bool = True,
        webhooks: bool = True,
        api_keys: Mapping[str, str] | None = None,
        backend: Stack | None = None,
        redis_url: str | None = None,
    ) -> None:
        if backend is not None and (storage_url is not None or not api):
            raise ValueError("a stack in front of a backend runs an API and uses the backend's storage")
        self.tmp = Path(tmp)
        self.log_dir = self.tmp / "logs"
        self.production = production
        self.api_workers = api_workers
        self.api_keys = dict(api_keys or {})
        self.backend = backend
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, list[str]] = {}
        self.redis_server: RedisServer | None = backend.redis_server if backend else None
        self._external_redis_url: str | None = backend._external_redis_url if backend else redis_url
        self.env: dict[str, str] = {}
        self._extra_env = dict(env or {})
        self._process_env = {name: dict(values) for name, values in (process_env or {}).items()}
        self._storage_url = storage_url or f"file://{self.tmp / 'outputs'}"
        own = backend is None
        self._wanted = {"api": api, "worker": worker and own, "webhooks": webhooks and own}
        self.api_port = free_port() if api else 0
        metrics_port = self._process_env.get("worker", {}).get("DARKROOM_WORKER_METRICS_PORT")
        self.worker_metrics_port = int(metrics_port) if metrics_port else None

    # --- addresses ---------------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        if not self.api_port:
            raise RuntimeError("this stack runs no API: put one in front of it (Stack(..., backend=it))")
        return f"http://{LOOPBACK}:{self.api_port}"

    @property
    def redis_url(self) -> str:
        if self._external_redis_url is not None:
            return self._external_redis_url
        if self.redis_server is None:
            raise RuntimeError("the stack is not started")
        return self.redis_server.url

    # --- clients -----------------------------------------------------------------------------------------

    def auth(self, name: str | None = None) -> dict[str, str]:
        """The Authorization header of key ``name`` (default: the first); none when auth is off."""
        if not self.api_keys:
            return {}
        return {"Authorization": f"Bearer {self.api_keys[name or next(iter(self.api_keys))]}"}

    def client(self, timeout: float = 30.0, **kwargs: Any) -> httpx.Client:
        """An HTTP client on the API, sending the first key's Authorization header when auth is on."""
        headers = {**self.auth(), **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.api_url, timeout=timeout, headers=headers, **kwargs)

    def redis(self) -> redis.Redis:
        return make_redis(self.redis_url)  # a Sentinel URL too

    def wait_for(self, job_id: str, statuses: set[str], timeout: float = 60.0) -> dict[str, Any]:
        """Poll the job until its status is in ``statuses`` (bounded: fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                job: dict[str, Any] = client.get(f"/v1/generations/{job_id}").json()
                if job["status"] in statuses:
                    return job
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")
                time.sleep(0.05)

    # --- processes ---------------------------------------------------------------------------------------

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def cpu_roots(self) -> dict[str, int]:
        """Process-tree roots to meter: each live darkroom process (a backend's too) plus Redis."""
        owners = [self, self.backend] if self.backend else [self]
        roots = {
            name: process.pid
            for owner in owners
            for name, process in owner.processes.items()
            if process.poll() is None
        }
        if self.redis_server is not None and self.redis_server.is_running():
            roots["redis"] = self.redis_server.pid
        return roots

    def logs(self, name: str, tail: int | None = 5000) -> str:
        """The last ``tail`` characters of a process's log, or all of it with ``tail=None`` (a backend's
        process: from the backend)."""
        path = self.log_dir / f"{name}.log"
        if not path.exists() and self.backend is not None:
            return self.backend.logs(name, tail)
        text = path.read_text(errors="replace") if path.exists() else ""
        return text if tail is None else text[-tail:]

    def spawn(self, name: str, command: list[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``command`` as process ``name`` with the stack's environment (plus ``env``), logging to
        ``log_dir/name.log``; it is stopped with the stack."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        own_env = {**self.env, **self._process_env.get(name, {}), **(env or {})}
        with (self.log_dir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                command, cwd=ROOT, env=own_env, stdout=log, stderr=subprocess.STDOUT
            )
        self.commands[name] = command

    def start_worker(self, name: str = "worker", env: Mapping[str, str] | None = None) -> None:
        """Start a GPU worker (``python -m worker``); ``env`` adds to the stack's environment."""
        self.spawn(name, [sys.executable, "-m", "worker"], env)

    def stop(self, name: str, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop one process (SIGTERM, then SIGKILL after ``timeout``); its exit code, None if unknown."""
        process = self.processes.pop(name, None)
        return None if process is None else stop_process(process, timeout)

    def stop_worker(self) -> None:
        """Warm-stop the GPU worker: submissions from now on stay queued."""
        self.stop("worker")
        self._wanted["worker"] = False

    def restart_api(self, workers: int) -> None:
        """Stop the API and start it again with ``workers`` uvicorn workers (same Redis, same port)."""
        self.stop("api")
        self.api_workers = workers
        self._spawn_api()
        self.wait_ready()

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start Redis (unless borrowed) and the processes asked for; return once they are ready."""
        try:
            if self.redis_server is None and self._external_redis_url is None:
                # Like production Redis (deploy/k8s/base/redis.yaml): append-only file, fsync every second.
                self.redis_server = RedisServer(self.tmp / "redis", appendonly=True).start()
            self.env = self._environment()
            if self._wanted["api"]:
                self._spawn_api()
            if self._wanted["worker"]:
                self.start_worker()
            if self._wanted["webhooks"]:
                self.spawn("webhooks", [sys.executable, "-m", "services.webhooks"])
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """SIGTERM every process at once (their shutdowns overlap), SIGKILL stragglers, then stop Redis
        if this stack started it."""
        processes, self.processes = self.processes, {}
        stop_processes(processes)
        if self.backend is None and self.redis_server is not None:
            self.redis_server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until the API (if any) answers /readyz and a GPU worker (if any, a backend's too) has registered
        with RQ; fails at once, with its log, if a process exits."""
        deadline = time.monotonic() + timeout
        wants_worker = self._wanted["worker"] or (self.backend is not None and self.backend._wanted["worker"])
        with self.redis() as connection:
            while time.monotonic() < deadline:
                self._check_alive()
                api_ready = "api" not in self.processes or self._answers("/readyz")
                worker_ready = not wants_worker or bool(connection.smembers(TINY_WORKERS))
                if api_ready and worker_ready:
                    time.sleep(0.5 if self.api_workers > 1 else 0)  # let every uvicorn worker finish startup
                    return
                time.sleep(0.1)
        raise RuntimeError(f"stack not ready in {timeout}s:\n{self.logs('api')}\n{self.logs('worker')}")

    def wait_idle(self, timeout: float = IDLE_TIMEOUT_S) -> None:
        """Until no tiny-model job waits in a queue and no worker is busy (seen twice, 50 ms apart).

        For a shared backend: a user that starts while an earlier one's jobs still run would see them in
        its queue positions and timings.
        """
        from rq import Worker
        from rq.worker import WorkerStatus

        deadline = time.monotonic() + timeout
        idle_seen = 0
        with self.redis() as connection:
            while idle_seen < 2:
                waiting = connection.llen(TINY_QUEUE) + connection.llen(TINY_BATCH_QUEUE)
                workers = Worker.all(connection=connection)
                busy = [w.name for w in workers if w.get_state() == WorkerStatus.BUSY]
                idle_seen = idle_seen + 1 if not waiting and not busy else 0
                if time.monotonic() > deadline:
                    raise RuntimeError(f"backend still busy after {timeout}s: {waiting} queued, busy: {busy}")
                time.sleep(0.05)

    # --- internals ---------------------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        """What every process of the stack starts with; a stack in front of a backend starts from the
        backend's (same Redis, storage, model, secrets), its own public URL and settings on top."""
        if self.backend is not None:
            env = dict(self.backend.env)
        else:
            env = {
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
                "DARKROOM_ENVIRONMENT": "production" if self.production else "development",
                "DARKROOM_REDIS_URL": self.redis_url,
                "DARKROOM_MODEL": "tiny",
                "DARKROOM_STORAGE_URL": self._storage_url,
                "DARKROOM_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "DARKROOM_WEBHOOK_ALLOW_PRIVATE": "true",
                "DARKROOM_WEBHOOK_ALLOW_HTTP": "true",
                "DARKROOM_AUTH_DISABLED": "true",
            }
            env.pop("DARKROOM_PUBLIC_URL", None)
        if self.api_keys:
            env["DARKROOM_AUTH_DISABLED"] = "false"
            env["DARKROOM_API_KEYS"] = hashed_keys(self.api_keys)
        if self.api_port:
            env["DARKROOM_PUBLIC_URL"] = self.api_url
        env.update(self._extra_env)
        return env

    def _check_alive(self) -> None:
        """Raise, with its log, if a process of this stack (or of its backend) has exited."""
        if self.backend is not None:
            self.backend._check_alive()
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.logs(name)}")

    def _spawn_api(self) -> None:
        command = uvicorn_command(self.api_port, workers=self.api_workers, production=self.production)
        self.spawn("api", command)

    def _answers(self, path: str) -> bool:
        try:
            return httpx.get(f"{self.api_url}{path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
