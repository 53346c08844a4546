"""The whole service for benchmarks: private Redis, the API with its production server settings, the GPU
worker on the offline tiny model, and the webhook worker — real processes on free loopback ports.

Unlike the test fixture (``tests/fixtures/stack.py``) this runs the API as production does
(``DARKROOM_ENVIRONMENT=production``: JSON logs, uvloop + httptools, uvicorn's own access log off because the
app writes its own line), lets a benchmark choose the number of uvicorn workers, restart the API with
another count against the same Redis, and stop the GPU worker so submissions pile up in the queue.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import redis

from bench.common import ROOT
from services.net import LOOPBACK, free_port
from services.redis_server import RedisServer

START_TIMEOUT_S = 180.0
API_KEYS = 8  # clients of the benchmark rotate over this many keys (each request checks the key ring)
STOP_TIMEOUT_S = 30.0
#: The tiny model's interactive queue and RQ's set of workers listening on it (DARKROOM_MODEL=tiny).
TINY_QUEUE = "rq:queue:darkroom:tiny"
TINY_WORKERS = "rq:workers:darkroom:tiny"
BENCH_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"darkroom-bench-webhook-secret-32").decode()


def uvicorn_command(port: int, workers: int) -> list[str]:
    """The API as production runs it (Dockerfile.api: ``uvicorn api.main:app``), loop and parser pinned."""
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", LOOPBACK, "--port", str(port)]
    if importlib.util.find_spec("uvloop") is not None:
        command += ["--loop", "uvloop"]
    if importlib.util.find_spec("httptools") is not None:
        command += ["--http", "httptools"]
    command += ["--no-access-log", "--workers", str(workers)]
    return command


@dataclass
class BenchStack:
    """Start with ``with BenchStack(tmp) as stack:``; every process it started is stopped on exit."""

    tmp: Path
    api_workers: int = 1
    with_worker: bool = True
    with_webhooks: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)
    redis_server: RedisServer | None = None
    api_port: int = 0
    api_keys: dict[str, str] = field(default_factory=dict)  # name -> token

    def __post_init__(self) -> None:
        self.api_keys = {f"bench-{i}": "drk_" + secrets.token_urlsafe(32) for i in range(API_KEYS)}

    def auth(self, name: str | None = None) -> dict[str, str]:
        """The Authorization header of key ``name`` (default: the first key)."""
        return {"Authorization": f"Bearer {self.api_keys[name or next(iter(self.api_keys))]}"}

    def http(self, timeout: float = 90.0) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=timeout, headers=self.auth())

    # --- addresses -------------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.api_port}"

    @property
    def redis_url(self) -> str:
        assert self.redis_server is not None
        return self.redis_server.url

    @property
    def log_dir(self) -> Path:
        return self.tmp / "logs"

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def cpu_roots(self) -> dict[str, int]:
        """Process-tree roots to meter: each darkroom process plus Redis."""
        roots = {name: process.pid for name, process in self.processes.items() if process.poll() is None}
        assert self.redis_server is not None
        roots["redis"] = self.redis_server.pid
        return roots

    def environment(self) -> dict[str, str]:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "DARKROOM_ENVIRONMENT": "production",
            "DARKROOM_REDIS_URL": self.redis_url,
            "DARKROOM_MODEL": "tiny",
            "DARKROOM_STORAGE_URL": f"file://{self.tmp / 'outputs'}",
            "DARKROOM_PUBLIC_URL": self.api_url,
            "DARKROOM_WEBHOOK_SECRET": BENCH_WEBHOOK_SECRET,
            "DARKROOM_WEBHOOK_ALLOW_PRIVATE": "true",
            "DARKROOM_WEBHOOK_ALLOW_HTTP": "true",
            # Production auth: hashed API keys, checked on every request, per-key rate limiter on. The limits
            # are raised far above the offered load so they never bind (their cost is still measured), and
            # the queue-depth ceiling is raised so a submission burst is measured, not refused.
            "DARKROOM_API_KEYS": ",".join(
                f"{name}:sha256:{hashlib.sha256(token.encode()).hexdigest()}"
                for name, token in self.api_keys.items()
            ),
            "DARKROOM_RATE_LIMIT_PER_MINUTE": "100000000",
            "DARKROOM_RATE_LIMIT_BURST": "10000000",
            "DARKROOM_MAX_QUEUE_DEPTH": "1000000",
        }
        env.update(self.extra_env)
        return env

    # --- lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        from worker.tiny_model import ensure_tiny_model  # build the tiny model once, before any worker

        self.log_dir.mkdir(parents=True, exist_ok=True)
        if "DARKROOM_TINY_MODEL_DIR" in self.extra_env:
            ensure_tiny_model(Path(self.extra_env["DARKROOM_TINY_MODEL_DIR"]))
        else:
            ensure_tiny_model()
        # Like production Redis (deploy/k8s/base/redis.yaml): append-only file, fsync every second.
        self.redis_server = RedisServer(self.tmp / "redis", appendonly=True).start()
        try:
            self.api_port = free_port()
            self._spawn("api", uvicorn_command(self.api_port, self.api_workers))
            if self.with_worker:
                self._spawn("worker", [sys.executable, "-m", "worker"])
            if self.with_webhooks:
                self._spawn("webhooks", [sys.executable, "-m", "services.webhooks"])
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)
        if self.redis_server is not None:
            self.redis_server.stop()

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        self.commands[name] = command
        self.processes[name] = subprocess.Popen(
            command, cwd=ROOT, env=self.environment(), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def stop(self, name: str) -> int | None:
        """SIGTERM (warm shutdown), bounded; SIGKILL if it does not go."""
        process = self.processes.pop(name, None)
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        return process.returncode

    def restart_api(self, workers: int) -> None:
        """Stop the API and start it again with ``workers`` uvicorn workers (same Redis, same port)."""
        self.stop("api")
        self.api_workers = workers
        self._spawn("api", uvicorn_command(self.api_port, workers))
        self.wait_ready()

    def stop_worker(self) -> None:
        """Warm-stop the GPU worker: submissions from now on stay queued."""
        self.stop("worker")
        self.with_worker = False

    def wait_ready(self) -> None:
        """Until /readyz answers 200 on every API worker and, if started, the GPU worker registered."""
        deadline = time.monotonic() + START_TIMEOUT_S
        connection = self.redis()
        try:
            while time.monotonic() < deadline:
                for name, process in self.processes.items():
                    if process.poll() is not None:
                        raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.logs(name)}")
                try:
                    api_ready = httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    api_ready = False
                worker_ready = not self.with_worker or bool(connection.smembers(TINY_WORKERS))
                if api_ready and worker_ready:
                    time.sleep(0.5 if self.api_workers > 1 else 0)  # let every uvicorn worker finish startup
                    return
                time.sleep(0.1)
        finally:
            connection.close()
        raise RuntimeError(
            f"stack not ready in {START_TIMEOUT_S}s:\n{self.logs('api')}\n{self.logs('worker')}"
        )

    def logs(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""
