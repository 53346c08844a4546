"""``python -m bench.isolation_webhooks``: tenant B's webhook lateness with tenant A's receivers misbehaving.

Issue 16, case 6. One real webhook process (``python -m services.webhooks``, default concurrency, per-host
share and attempt deadline unless overridden), a private Redis, loopback receivers. Two phases:

- **attack off**: B's events only, paced (``--b-rate`` per second) to one normal receiver;
- **attack on**: first A's (jobs of API key ``key-a``; B's are ``key-b``'s) — ``--a-receivers`` hanging
  and as many trickling receivers (a header line a second), ``--a-events`` events each, like a batch
  finishing — then B's, paced the same way.

Lateness is ``received − event``: when B's receiver got the webhook minus when the job finished (both on
this machine's monotonic clock). B's deliveries not received within ``--wait`` seconds are counted as
missing. Results go to ``bench/results/isolation-webhooks.json``.

Run it on the code before the change to compare (same file and ``tests/fixtures/slow_receiver.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from bench.common import ROOT, machine_facts, summary, write_results
from devtools.redis_server import RedisServer
from services.clients import build_clients
from services.settings import Settings
from services.storage import FileStorage
from tests.fixtures.http_receiver import HttpReceiver
from tests.fixtures.slow_receiver import SlowReceiver
from tests.services.test_webhook_tasks import SECRET, create_job


@contextmanager
def scratch_settings(tmp: Path) -> Iterator[Settings]:
    """Settings for a webhook bench: a private redis-server under ``tmp`` (stopped on exit), file storage,
    loopback receivers allowed."""
    server = RedisServer(tmp / "redis").start()
    try:
        yield Settings(
            redis_url=server.url,
            storage_url=f"file://{tmp / 'objects'}",
            public_url="http://darkroom.test",
            webhook_secret=SECRET,
            webhook_allow_private=True,
            webhook_allow_http=True,
        )
    finally:
        server.stop()


def worker_env(settings: Settings, overrides: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
    env.update(
        {
            "DARKROOM_REDIS_URL": settings.redis_url,
            "DARKROOM_STORAGE_URL": settings.storage_url,
            "DARKROOM_PUBLIC_URL": settings.public_url or "",
            "DARKROOM_WEBHOOK_SECRET": SECRET,
            "DARKROOM_WEBHOOK_ALLOW_PRIVATE": "true",
            "DARKROOM_WEBHOOK_ALLOW_HTTP": "true",
            "DARKROOM_WEBHOOK_MAX_ATTEMPTS": "2",
            "DARKROOM_ENVIRONMENT": "production",
            **overrides,
        }
    )
    return env


def run_phase(settings: Settings, args: argparse.Namespace, attack: bool, tmp: Path) -> dict[str, Any]:
    clients = build_clients(settings)
    clients.redis.flushall()
    storage = clients.storage
    assert isinstance(storage, FileStorage)
    overrides = dict(item.split("=", 1) for item in args.env)
    with open(tmp / f"worker-{attack}.err", "wb") as err, HttpReceiver() as normal:
        worker = subprocess.Popen(
            [sys.executable, "-m", "services.webhooks"],
            cwd=ROOT,
            env=worker_env(settings, overrides),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        slow: list[SlowReceiver] = []
        try:
            create_job(clients, storage, normal.url, owner="key-b")  # warm-up: the worker is up once it lands
            normal.wait_for(1, timeout=30)
            if attack:
                for _ in range(args.a_receivers):
                    slow.append(SlowReceiver("hang").start())
                    slow.append(SlowReceiver("trickle", interval_s=1.0).start())
                for _ in range(args.a_events):
                    for receiver in slow:
                        create_job(clients, storage, receiver.url, owner="key-a")
            created: dict[str, float] = {}
            for _ in range(args.b_events):
                created[create_job(clients, storage, normal.url, owner="key-b")] = time.monotonic()
                time.sleep(1.0 / args.b_rate)
            deadline = time.monotonic() + args.wait
            while len(normal.requests) < args.b_events + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            received = normal.requests[1:]
            lateness = [r.received_at - created[json.loads(r.body)["data"]["id"]] for r in received]
            held = {"max_concurrent_per_receiver": max((s.max_concurrent for s in slow), default=0)}
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
            for receiver in slow:
                receiver.close()
            clients.close()
    return {
        "attack": attack,
        "b_lateness_ms": summary(lateness, 1000.0),
        "b_missing": args.b_events - len(lateness),
        "a_events": args.a_events * len(slow) if attack else 0,
        **held,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.isolation_webhooks", description=__doc__)
    parser.add_argument("--a-receivers", type=int, default=1, help="hanging and trickling receivers, each")
    parser.add_argument("--a-events", type=int, default=20, help="events per misbehaving receiver")
    parser.add_argument("--b-events", type=int, default=200)
    parser.add_argument("--b-rate", type=float, default=20.0, help="B's events per second")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for B's last webhook")
    parser.add_argument("--env", action="append", default=[], help="DARKROOM_X=value for the worker")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    # The job lifecycle this bench drives logs every transition at debug level: keep the output readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    facts = machine_facts()
    with tempfile.TemporaryDirectory(prefix="bench-hooks-") as name, scratch_settings(Path(name)) as settings:
        phases = [run_phase(settings, args, attack, Path(name)) for attack in (False, True)]
    for phase in phases:
        late = {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), **phase["b_lateness_ms"]}
        state = "on " if phase["attack"] else "off"
        print(
            f"attack {state}: B lateness p50 {late['p50']:.0f} ms, "
            f"p99 {late['p99']:.0f} ms, max {late['max']:.0f} ms "
            f"(n={late['n']}, missing {phase['b_missing']}); A events {phase['a_events']}, "
            f"at most {phase['max_concurrent_per_receiver']} connections per A receiver"
        )
    path = write_results(
        "isolation-webhooks",
        {"machine": facts, "args": vars(args) | {"out": None}, "phases": phases},
        args.out,
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
