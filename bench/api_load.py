"""API under load: ``POST /v1/generations`` submissions per second, and ``GET /v1/generations/{id}``
latency at a fixed request rate, with the CPU each process spent per request.

Submissions run with the GPU worker stopped (jobs pile up in the queue, as in a burst): the figure is what
the API and Redis sustain, not what GPUs drain. GETs read a realistic mix of finished jobs (image URLs signed
on every read) and queued ones (queue position looked up on every read).
"""

from __future__ import annotations

import json
import random
from typing import Any
from urllib.parse import urlsplit

from bench.common import CpuMeter
from bench.http_load import build_request, closed_loop, open_loop, run
from bench.redis_cost import delta, snapshot
from devtools.stack import TINY_QUEUE, Stack

SUBMISSION: dict[str, Any] = {
    "prompt": "a lighthouse at dusk, volumetric fog, 35mm photo",
    "aspect_ratio": "16:9",
}


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def submission_request(host: str, auth: dict[str, str] | None = None) -> bytes:
    body = json.dumps(SUBMISSION).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json", **(auth or {})}
    return build_request("POST", "/v1/generations", host, body, headers)


def measure_submissions(
    stack: Stack, *, concurrency: int, max_requests: int, max_seconds: float, warmup: int
) -> dict[str, Any]:
    host, port = _host_port(stack.api_url)
    # Requests rotate over the stack's API keys, as many clients would.
    raws = [submission_request(f"{host}:{port}", stack.auth(name)) for name in stack.api_keys]

    def make(index: int) -> bytes:
        return raws[index % len(raws)]

    run(closed_loop(host, port, make, concurrency=concurrency, max_requests=warmup, max_seconds=30))
    redis_client = stack.redis()
    meter = CpuMeter(stack.cpu_roots())
    before = snapshot(redis_client)
    meter.start()
    result = run(
        closed_loop(
            host,
            port,
            make,
            concurrency=concurrency,
            max_requests=max_requests,
            max_seconds=max_seconds,
            keep_bodies=3,
        )
    )
    used = meter.stop()
    after = snapshot(redis_client)
    queued = int(redis_client.llen(TINY_QUEUE))
    redis_client.close()
    accepted = result.statuses.get(202, 0)
    report = result.report()
    report.update(
        concurrency=concurrency,
        api_workers=stack.api_workers,
        accepted=accepted,
        queue_length_after=queued,
        cpu_s=used,
        cores_busy=meter.cores(),
        cpu_ms_per_submission={name: round(s * 1000 / max(accepted, 1), 3) for name, s in used.items()},
        redis_per_submission=delta(before, after, per=max(accepted, 1)),
        sample_status=[json.loads(b).get("status") for b in result.bodies],
    )
    api_cpu = used.get("api", 0.0)
    report["submissions_per_api_core_s"] = round(accepted / api_cpu, 1) if api_cpu else None
    return report


def trim_queue(stack: Stack, keep: int) -> list[str]:
    """Keep the first ``keep`` queued jobs (a bounded backlog); returns their ids, in queue order."""
    client = stack.redis()
    client.ltrim(TINY_QUEUE, 0, keep - 1)
    members: list[bytes] = client.lrange(TINY_QUEUE, 0, -1)  # type: ignore[assignment]
    ids = [member.decode() for member in members]
    client.close()
    return ids


def get_targets(finished: list[str], queued: list[str], count: int, seed: int = 7) -> list[str]:
    """A polling mix: half finished jobs, half queued ones spread over the backlog."""
    rng = random.Random(seed)
    targets = []
    for index in range(count):
        pool = finished if (index % 2 == 0 and finished) or not queued else queued
        targets.append(rng.choice(pool))
    return targets


def measure_gets(
    stack: Stack,
    *,
    finished: list[str],
    queued: list[str],
    rate: float,
    duration_s: float,
    saturation_s: float,
    concurrency: int,
) -> dict[str, Any]:
    host, port = _host_port(stack.api_url)
    authority = f"{host}:{port}"
    targets = get_targets(finished, queued, 512)
    with stack.redis() as client:  # each job is readable only with the key that created it
        owners = {
            job_id: (client.hget(f"darkroom:job:{job_id}", "owner") or b"").decode()
            for job_id in set(targets)
        }
    requests = [
        build_request(
            "GET",
            f"/v1/generations/{job_id}",
            authority,
            headers=stack.auth(owners[job_id] if owners[job_id] in stack.api_keys else None),
        )
        for job_id in targets
    ]
    finished_set = set(finished)

    def make(index: int) -> bytes:
        return requests[index % len(requests)]

    run(closed_loop(host, port, make, concurrency=8, max_requests=200, max_seconds=10))  # warm up
    redis_client = stack.redis()
    meter = CpuMeter(stack.cpu_roots())
    before = snapshot(redis_client)
    meter.start()
    paced = run(open_loop(host, port, make, rate=rate, duration_s=duration_s))
    used = meter.stop()
    after = snapshot(redis_client)
    report = paced.report()
    report.update(
        rate_per_s=rate,
        api_workers=stack.api_workers,
        targets={
            "finished": sum(t in finished_set for t in targets),
            "queued": sum(t not in finished_set for t in targets),
        },
        cpu_s=used,
        cores_busy=meter.cores(),
        redis_per_get=delta(before, after, per=max(paced.completed, 1)),
    )
    # Closed loop: how many GETs/s the API sustains at all, and the API CPU per GET.
    meter = CpuMeter(stack.cpu_roots()).start()
    saturated = run(
        closed_loop(host, port, make, concurrency=concurrency, max_requests=200_000, max_seconds=saturation_s)
    )
    used = meter.stop()
    report["saturation"] = {
        **saturated.report(),
        "concurrency": concurrency,
        "cores_busy": meter.cores(),
        "cpu_ms_per_get": {
            name: round(s * 1000 / max(saturated.completed, 1), 3) for name, s in used.items()
        },
    }
    redis_client.close()
    return report
