"""Tenant isolation at admission and on reads (issue #16, cases 3, 4, 5 and 9), measured.

One API process (uvicorn, its own process) on a private Redis, two API keys. For each case key A runs the
attack from threads while key B submits and reads; B's GET and POST latencies (p50/p99) and its 5xx are
recorded with the attack off and on, and A's answers are counted. Case 4 measures Redis bytes per batch
item (``INFO memory`` before/after the largest batch allowed: 1,000 items, just under 8 MiB), how long
that batch's admission holds Redis (worst PING beside it, longest SLOWLOG entry), and what a 10,000-emoji
``count: 1000`` batch gets.

    python -m bench.isolation_admission [--seconds 15] [--attackers 4]

Writes ``bench/results/isolation-admission.json``.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
from PIL import Image

from bench.common import machine_facts, summary, write_results
from devtools.net import LOOPBACK, free_port
from devtools.redis_server import RedisServer
from services.api_keys import hash_key, new_key

ALICE, BOB = new_key(), new_key()
BODY = {"prompt": "a fox", "width": 512, "height": 512, "num_inference_steps": 1}


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 255).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _api(redis_url: str, storage: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    environment = {
        **os.environ,
        "DARKROOM_REDIS_URL": redis_url,
        "DARKROOM_STORAGE_URL": f"file://{storage}",
        "DARKROOM_API_KEYS": f"alice:sha256:{hash_key(ALICE)},bob:sha256:{hash_key(BOB)}",
        "DARKROOM_ENVIRONMENT": "production",
        "DARKROOM_UNSERVED_AFTER": "0",
        **env,
    }
    command = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", LOOPBACK]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--no-access-log", "--log-level", "warning"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the API did not start")


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _tenant_b(url: str, job_id: str, seconds: float) -> dict[str, Any]:
    """B alternates 3 GETs of its job and 1 POST for ``seconds``: latencies and statuses."""
    gets: list[float] = []
    posts: list[float] = []
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + seconds
    with _client(url, BOB) as bob:
        n = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            if n % 4 == 3:
                answer = bob.post("/v1/generations", json=BODY)
                posts.append(time.perf_counter() - started)
            else:
                answer = bob.get(f"/v1/generations/{job_id}")
                gets.append(time.perf_counter() - started)
            statuses[answer.status_code] += 1
            n += 1
            time.sleep(0.02)
    return {
        "get_ms": summary(gets, 1000),
        "post_ms": summary(posts, 1000),
        "statuses": dict(statuses),
        "5xx": sum(count for status, count in statuses.items() if status >= 500),
    }


def _phase(
    url: str, job_id: str, seconds: float, attackers: int, attack: Callable[[httpx.Client], Any] | None
) -> dict[str, Any]:
    answers: Counter[int] = Counter()
    stop = threading.Event()

    def loop() -> None:
        assert attack is not None
        with _client(url, ALICE) as alice:
            while not stop.is_set():
                answers[attack(alice).status_code] += 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(attackers if attack else 0)]
    for thread in threads:
        thread.start()
    b = _tenant_b(url, job_id, seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return {"b": b, "a_statuses": dict(answers)}


def run(seconds: float, attackers: int) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine_facts(), "seconds": seconds, "attackers": attackers}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        conn = redis.Redis.from_url(server.url)
        env = {"DARKROOM_RATE_LIMIT_PER_MINUTE": "600", "DARKROOM_RATE_LIMIT_BURST": "60"}
        process, url = _api(server.url, Path(tmp) / "files", env)
        try:
            with _client(url, BOB) as bob:
                job_id = bob.post("/v1/generations", json=BODY).json()["id"]
            hostile = {**BODY, "init_image": _png(4096, 4096), "mask_image": _png(4000, 4000)}
            big_batches = []
            with _client(url, ALICE) as alice:
                for _ in range(10):
                    answer = alice.post("/v1/batches", json={"template": BODY, "count": 1000})
                    if answer.status_code == 202:
                        big_batches.append(answer.json()["id"])
            cases: dict[str, Callable[[httpx.Client], Any]] = {
                "case3_images": lambda c: c.post("/v1/generations", json=hostile),
                "case9_list_batches": lambda c: c.get("/v1/batches", params={"limit": 100}),
                "case5_fill_batch_queue": lambda c: c.post(
                    "/v1/batches", json={"template": BODY, "count": 100}
                ),
            }
            results["baseline"] = _phase(url, job_id, seconds, attackers, None)
            for name, attack in cases.items():
                results[name] = _phase(url, job_id, seconds, attackers, attack)
                print(name, results[name], flush=True)
            results["case9_batches_listed"] = len(big_batches)

            # Case 4: bytes per batch item, and the amplifying batch.
            conn.execute_command("MEMORY", "PURGE")
            before = int(conn.info("memory")["used_memory"])
            # The largest batch allowed (just under 8 MiB of requests): how long does it hold Redis? Worst
            # PING of a client looping beside it, and the longest command Redis logged.
            worst_ping = [0.0]
            stop = threading.Event()

            def pinger() -> None:
                client = redis.Redis.from_url(server.url)
                while not stop.is_set():
                    sent = time.perf_counter()
                    client.ping()
                    worst_ping[0] = max(worst_ping[0], time.perf_counter() - sent)

            conn.config_set("slowlog-log-slower-than", 0)
            conn.config_set("slowlog-max-len", 100_000)
            conn.slowlog_reset()
            pinging = threading.Thread(target=pinger, daemon=True)
            pinging.start()
            with _client(url, BOB) as bob:
                prompt = "\U0001f600" * 1969  # 7,876 bytes: 1,000 items store just under 8 MiB
                started = time.perf_counter()
                ok = bob.post("/v1/batches", json={"template": {**BODY, "prompt": prompt}, "count": 1000})
                admit_s = time.perf_counter() - started
                stop.set()
                pinging.join()
                longest_ms = max(e["duration"] for e in conn.slowlog_get(100_000)) / 1000
                conn.config_set("slowlog-log-slower-than", 10_000)
                time.sleep(3)  # Redis shrinks the idle client's query buffer (clientsCron)
                after = int(conn.info("memory")["used_memory"])
                huge = bob.post(
                    "/v1/batches", json={"template": {**BODY, "prompt": "\U0001f600" * 10_000}, "count": 1000}
                )
            results["case4"] = {
                "batch_status": ok.status_code,
                "items": 1000,
                "prompt_utf8_bytes": len(prompt.encode()),
                "bytes_per_item": (after - before) / 1000,
                "admit_ms": admit_s * 1000,
                "worst_ping_ms_during_admission": worst_ping[0] * 1000,
                "longest_redis_command_ms": longest_ms,
                "emoji_10k_count_1000_status": huge.status_code,
                "emoji_10k_count_1000_code": huge.json().get("code"),
            }
            print("case4", results["case4"], flush=True)
        finally:
            process.terminate()
            process.wait(10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="Length of each phase.")
    parser.add_argument("--attackers", type=int, default=4, help="Key A's threads.")
    args = parser.parse_args()
    path = write_results("isolation-admission", run(args.seconds, args.attackers))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
