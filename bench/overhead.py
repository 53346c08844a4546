"""Service overhead: the same request as a direct engine call and through the whole service, interleaved.

Direct: ``GenerationEngine.generate`` in this process (the tiny model, loaded as the worker loads it).
Service: ``POST /v1/generations`` with ``Prefer: wait=60`` -> API validates, stores, enqueues -> the GPU
worker (another process, same tiny model) claims it, generates, uploads to storage, records the result ->
the API, blocked on the job's event stream, answers 200 with the final job -> the client has it.

Pairs run back to back with the order alternated (direct first, then service first), so slow drifts of the
machine hit both sides alike; the per-pair difference is the overhead. Each service job's own timestamps and
the engine time the worker measured inside that very job also give a per-phase breakdown with far less
noise than the difference of two separate runs.

The size is 512x512 (4 steps), not 64x64: the API refuses sides below 256 px and images below 0.25 MP (the
model's contract), and both sides must do the same work for their difference to be pure service overhead.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import httpx

from bench.common import ms, summary
from devtools.stack import Stack

REQUEST: dict[str, Any] = {
    "prompt": "a red fox in the snow, golden hour",
    "width": 512,
    "height": 512,
    "num_inference_steps": 4,
}


def load_engine() -> Any:
    """The tiny model through the worker's own loader, in this process (fp32 on CPU, as the worker)."""
    from services.settings import Settings
    from worker.engine import GenerationEngine
    from worker.pipeline_loader import load_pipeline

    return GenerationEngine(load_pipeline(Settings(model="tiny", warmup=False)))


def direct_call(engine: Any, seed: int) -> float:
    from schemas.generation import GenerationRequest

    started = time.perf_counter()
    result = engine.generate(GenerationRequest(**REQUEST, seed=seed))
    elapsed = time.perf_counter() - started
    assert result.images, "the engine returned no image"
    return elapsed


def service_call(client: httpx.Client, seed: int, timeout_s: float = 60.0) -> dict[str, Any]:
    sent_at = time.time()
    started = time.perf_counter()
    response = client.post(
        "/v1/generations", json={**REQUEST, "seed": seed}, headers={"Prefer": f"wait={int(timeout_s)}"}
    )
    job = response.json()
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or job.get("status") != "succeeded":
        raise RuntimeError(f"service call did not succeed: HTTP {response.status_code} {job}")
    return {"total_s": elapsed, "sent_at": sent_at, "job_id": job["id"], "images": len(job["images"])}


def job_phases(redis_client: Any, call: dict[str, Any]) -> dict[str, float]:
    """Split one service call by the job's own timestamps (same machine, same clock)."""
    raw = redis_client.hgetall(f"darkroom:job:{call['job_id']}")
    data = {k.decode(): v.decode() for k, v in raw.items()}

    def at(name: str) -> float:
        return datetime.fromisoformat(data[name]).timestamp()

    timings = json.loads(data.get("timings") or "{}")
    engine_s = float(timings.get("generate_s", 0.0)) + float(timings.get("encode_s", 0.0))
    created, started, completed = at("created_at"), at("started_at"), at("completed_at")
    received = call["sent_at"] + call["total_s"]
    return {
        "submit_s": created - call["sent_at"],  # client -> API -> job record written
        "pickup_s": started - created,  # enqueue -> worker dequeues and claims it
        "engine_s": engine_s,  # generate + encode, timed inside the worker
        "worker_other_s": (completed - started) - engine_s,  # request load, progress, upload, bookkeeping
        "notify_s": received - completed,  # terminal event -> API wakes -> renders -> client has it
        "outside_engine_s": call["total_s"] - engine_s,
    }


def measure_overhead(stack: Stack, engine: Any, *, pairs: int, warmup: int = 2) -> dict[str, Any]:
    direct: list[float] = []
    service: list[float] = []
    phases: list[dict[str, float]] = []
    job_ids: list[str] = []
    redis_client = stack.redis()
    with stack.client(timeout=90.0) as client:
        for index in range(warmup + pairs):
            seed = 1000 + index
            if index % 2 == 0:
                d = direct_call(engine, seed)
                s = service_call(client, seed)
            else:
                s = service_call(client, seed)
                d = direct_call(engine, seed)
            job_ids.append(s["job_id"])
            if index < warmup:
                continue
            direct.append(d)
            service.append(s["total_s"])
            phases.append(job_phases(redis_client, s))
    redis_client.close()
    differences = [s - d for s, d in zip(service, direct, strict=True)]
    ratios = [s / d for s, d in zip(service, direct, strict=True)]
    phase_summary = {
        name: summary([p[name] for p in phases], 1000.0) for name in (phases[0] if phases else {})
    }
    return {
        "request": REQUEST,
        "pairs": pairs,
        "warmup_pairs": warmup,
        "order": "alternating (even pairs direct first, odd pairs service first)",
        "direct_ms": summary(direct, 1000.0),
        "service_ms": summary(service, 1000.0),
        "difference_ms": summary(differences, 1000.0),
        "ratio": summary(ratios),
        "phases_ms": phase_summary,
        "raw": {
            "direct_ms": [ms(x) for x in direct],
            "service_ms": [ms(x) for x in service],
        },
        "job_ids": job_ids,
    }
