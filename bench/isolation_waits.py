"""Issue 16, case 2: one key holding many waits (SSE streams, ``Prefer: wait``) must not hurt another key.

``python -m bench.isolation_waits [--connections N] [--duration S]``: a stack with two keys and no GPU worker
(jobs stay queued, so every wait lasts), production mode. Key B loops GET job / POST job / GET /readyz for
``--duration`` seconds twice: attack off, then on — key A holding ``--connections`` open waits, half SSE
streams and half ``Prefer: wait=60`` submissions, on raw sockets. Reports B's p50/p99 per request kind and
its 5xx count each time, how many of A's waits were admitted or refused (429 ``too_many_waits``, 503
``server_busy``), and how long A's share takes to come back once its sockets close. Results go to
``bench/results/isolation-waits.json``.

The helpers (raw-socket waits, the other key's probe) are what tests/api/test_waits.py uses too.
"""

from __future__ import annotations

import argparse
import json
import secrets
import selectors
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis

from bench.common import machine_facts, summary, write_results
from devtools.stack import Stack
from services.settings import Settings

BODY = {"prompt": "a lighthouse at dusk", "width": 512, "height": 512}


# --- waits on raw sockets ------------------------------------------------------------------------------


def _request(method: str, path: str, host: str, token: str | None, body: bytes, prefer: str | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Accept: */*"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if prefer:
        lines.append(f"Prefer: {prefer}")
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def open_waits(
    base_url: str,
    token: str | None,
    path: str,
    count: int,
    *,
    method: str = "GET",
    body: dict[str, Any] | None = None,
    prefer: str | None = None,
) -> list[socket.socket]:
    """``count`` connections, each with one request sent and nothing read: a client holding a wait."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    payload = json.dumps(body).encode() if body is not None else b""
    request = _request(method, path, f"{host}:{port}", token, payload, prefer)
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(request)
        sockets.append(sock)
    return sockets


def statuses(sockets: list[socket.socket], wait_s: float) -> list[int | None]:
    """Each socket's response status, or None for one that has answered nothing within ``wait_s`` (a held
    ``Prefer: wait``). An SSE stream answers its 200 at once; a refusal, its 429 or 503."""
    found: dict[int, int | None] = dict.fromkeys(range(len(sockets)))
    received = dict.fromkeys(range(len(sockets)), b"")
    with selectors.DefaultSelector() as selector:
        for index, sock in enumerate(sockets):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + wait_s
        while (remaining := deadline - time.monotonic()) > 0 and selector.get_map():
            for key, _ in selector.select(remaining):
                index = key.data
                chunk = sockets[index].recv(65536)
                received[index] += chunk
                if b"\r\n" in received[index] or not chunk:
                    status_line = received[index].split(b"\r\n", 1)[0].split()
                    found[index] = int(status_line[1]) if len(status_line) > 1 else None
                    selector.unregister(sockets[index])
        for sock in sockets:
            sock.setblocking(True)
    return [found[index] for index in range(len(sockets))]


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


# --- the other key's view ------------------------------------------------------------------------------


def probe_other_key(
    base_url: str, token: str | None, job_id: str, duration_s: float, *, max_requests: int = 100_000
) -> dict[str, Any]:
    """Loop GET job / POST job / GET /readyz for ``duration_s``; latency summaries (ms) and status counts."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies: dict[str, list[float]] = {"get": [], "post": [], "readyz": []}
    codes: Counter[str] = Counter()
    calls: dict[str, Callable[[httpx.Client], httpx.Response]] = {
        "get": lambda client: client.get(f"/v1/generations/{job_id}"),
        "post": lambda client: client.post("/v1/generations", json=BODY),
        "readyz": lambda client: client.get("/readyz"),
    }
    deadline = time.monotonic() + duration_s
    done = 0
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        while time.monotonic() < deadline and done < max_requests:
            for kind, call in calls.items():
                start = time.perf_counter()
                response = call(client)
                latencies[kind].append(time.perf_counter() - start)
                codes[f"{kind} {response.status_code}"] += 1
                done += 1
    server_errors = sum(count for name, count in codes.items() if name.split()[1].startswith("5"))
    return {
        **{kind: summary(values, 1000.0) for kind, values in latencies.items()},
        "statuses": dict(codes),
        "5xx": server_errors,
    }


def wait_released(client: redis.Redis, principal: str, timeout_s: float = 30.0) -> float | None:
    """Seconds until ``principal`` holds no wait lease (api/waits.py), or None if it still does."""
    from api.waits import lease_key

    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if client.zcard(lease_key(principal)) == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    return None


# --- the benchmark -------------------------------------------------------------------------------------


def run(connections: int, duration_s: float, per_key: int | None, max_waits: int | None) -> dict[str, Any]:
    keys = {"a": "dr_" + secrets.token_urlsafe(24), "b": "dr_" + secrets.token_urlsafe(24)}
    env = {"DARKROOM_RATE_LIMIT_PER_MINUTE": "0"}  # B's POST loop measures isolation, not its own budget
    if per_key is not None:
        env["DARKROOM_MAX_WAITS_PER_KEY"] = str(per_key)
    if max_waits is not None:
        env["DARKROOM_MAX_WAITS"] = str(max_waits)
    defaults = Settings(redis_url="redis://unused", auth_disabled=True)
    with (
        tempfile.TemporaryDirectory(prefix="darkroom-isolation-") as tmp,
        Stack(Path(tmp), env=env, production=True, worker=False, webhooks=False, api_keys=keys) as stack,
        stack.redis() as store,
    ):
        jobs = {}
        for name in keys:
            answer = httpx.post(f"{stack.api_url}/v1/generations", json=BODY, headers=stack.auth(name))
            answer.raise_for_status()
            jobs[name] = answer.json()["id"]
        off = probe_other_key(stack.api_url, keys["b"], jobs["b"], duration_s)
        streams = open_waits(
            stack.api_url, keys["a"], f"/v1/generations/{jobs['a']}/events", connections // 2
        )
        waits = open_waits(
            stack.api_url,
            keys["a"],
            "/v1/generations",
            connections - connections // 2,
            method="POST",
            body=BODY,
            prefer="wait=60",
        )
        attack = statuses(streams + waits, wait_s=3.0)
        on = probe_other_key(stack.api_url, keys["b"], jobs["b"], duration_s)
        close_all(streams + waits)
        released_s = wait_released(store, "a") if per_key != 0 else None  # no leases without a share
    return {
        "connections": connections,
        "duration_s": duration_s,
        "max_waits_per_key": per_key if per_key is not None else defaults.max_waits_per_key,
        "max_waits": max_waits if max_waits is not None else defaults.max_waits,
        "attacker": {str(status) if status else "held": count for status, count in Counter(attack).items()},
        "attacker_released_s": released_s,
        "other_key": {"attack_off": off, "attack_on": on},
    }


def report(results: dict[str, Any]) -> str:
    lines = [
        f"key A: {results['connections']} waits asked -> {results['attacker']} "
        f"(share {results['max_waits_per_key']}, process cap {results['max_waits']}); "
        f"released {results['attacker_released_s']} s after its sockets closed",
    ]
    for phase, figures in results["other_key"].items():
        parts = [
            f"{kind} p50 {figures[kind]['p50']:.1f} ms p99 {figures[kind]['p99']:.1f} ms"
            for kind in ("get", "post", "readyz")
        ]
        lines.append(f"key B, {phase}: " + "; ".join(parts) + f"; 5xx {figures['5xx']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=300, help="waits key A holds (half SSE)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds key B is measured, per phase")
    parser.add_argument("--per-key", type=int, default=None, help="DARKROOM_MAX_WAITS_PER_KEY (0: off)")
    parser.add_argument("--max-waits", type=int, default=None, help="DARKROOM_MAX_WAITS")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = run(args.connections, args.duration, args.per_key, args.max_waits)
    results["figures_ms"] = {
        phase: {kind: {"p50": figures[kind]["p50"], "p99": figures[kind]["p99"]} for kind in ("get", "post")}
        for phase, figures in results["other_key"].items()
    }
    path = write_results(
        "isolation-waits", {"machine": machine_facts(), "command": sys.argv, **results}, args.out
    )
    print(report(results))
    print(f"results: {path}")
    errors = sum(figures["5xx"] for figures in results["other_key"].values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
