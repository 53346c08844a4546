"""What a finished job costs Redis before and after the archive (``services.jobs.archiver``), measured.

On a scratch Redis and a scratch file store: ``--jobs`` jobs are run through the real lifecycle as a
worker runs them (a ~300-character prompt, ``--steps`` progress events, a webhook subscribed to the
terminal event whose delivery is recorded ``delivered``); then per job ``MEMORY USAGE`` of every key that
names it and its TTL, before the archiver ran (what Redis kept until now: the retention) and after (the same
keys, now expiring after ``DARKROOM_FINISHED_TTL``), and the archive object's size. RQ's own records are
not built here: with ``result_ttl`` 0 RQ deletes its job hash and keeps no result when the job finishes
(``tests/services/test_rq_records.py``); before, they were 1.9 KB + 4.7 KB for a day (BENCHMARKS.md).

``python -m bench.archive_cost [--jobs 50] [--steps 28]``; results in bench/results/archive-cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import redis

from devtools.redis_server import RedisServer
from schemas.generation import GenerationRequest
from schemas.jobs import JobStatus
from services.jobs import (
    JobRecord,
    JobStore,
    Lifecycle,
    encode_fields,
    events_key,
    job_key,
    new_job_id,
    utcnow,
)
from services.jobs.archive import JobArchive, job_object_key
from services.jobs.archiver import Archiver
from services.jobs.outcome import Succeeded
from services.settings import Settings
from services.storage import FileStorage, image_key

RESULTS = Path(__file__).parent / "results" / "archive-cost.json"
PROMPT = ("a lighthouse on a basalt cliff at dusk, volumetric light, long exposure, " * 4).strip()
HOOK = {"url": "https://hooks.example.com/darkroom", "events": ["generation.succeeded"]}


def run_job(client: redis.Redis, storage: FileStorage, steps: int) -> str:
    """One job, admitted, run and finished as the worker does, with its webhook delivered."""
    request = GenerationRequest(prompt=PROMPT, negative_prompt="blurry", seed=1, num_inference_steps=steps)
    record = JobRecord(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        created_at=utcnow(),
        request=request.normalized().model_dump(mode="json", exclude={"init_image"}),
        webhook=HOOK,
        owner="bench",
    )
    event = json.dumps({"status": "queued", "at": record.created_at.isoformat()})
    with client.pipeline() as pipe:  # what admission writes
        pipe.hset(job_key(record.id), mapping=cast(Any, encode_fields(record.creation_fields())))
        pipe.xadd(events_key(record.id), {"type": "status", "data": event})
        for key in (job_key(record.id), events_key(record.id)):
            pipe.expire(key, int(timedelta(days=7).total_seconds()))
        pipe.execute()
    lifecycle = Lifecycle(client, timedelta(days=7))
    assert lifecycle.claim(record, "worker-bench").applied
    for step in range(1, steps + 1):
        lifecycle.progress(record.id, "worker-bench", step, steps)
    key = image_key(record.id, 0, "png", record.created_at)
    storage.put(key, b"png", "image/png")
    image = {
        "key": key,
        "seed": 1,
        "width": 1024,
        "height": 1024,
        "content_type": "image/png",
        "sha256": "0" * 64,
        "finish_reason": "stop",
    }
    outcome = Succeeded([image], timings={"load_ms": 1.0, "denoise_ms": 9000.0, "decode_ms": 300.0})
    running = JobStore(client, timedelta(days=7)).get(record.id)
    assert running is not None and lifecycle.finish(running, "worker-bench", outcome).applied
    store = JobStore(client, timedelta(days=7))
    delivery: dict[str, Any] = {
        "event": "generation.succeeded",
        "msg_id": "msg_" + record.id[4:],
        "state": "delivered",
        "created_at": utcnow().isoformat(),
        "attempts": [
            {"at": utcnow().isoformat(), "attempt": 1, "status_code": 200, "error": None, "duration_ms": 41.2}
        ],
    }
    store.add_delivery(record.id, delivery["msg_id"], delivery)
    return record.id


def keys_of(client: redis.Redis, job_id: str) -> dict[str, dict[str, int]]:
    found = sorted(key.decode() for key in client.scan_iter(match=f"*{job_id}*", count=1000))
    return {
        key: {"bytes": int(client.memory_usage(key, samples=0) or 0), "ttl_s": int(client.ttl(key))}
        for key in found
    }


def byte_seconds(keys: dict[str, dict[str, int]]) -> float:
    return float(sum(entry["bytes"] * max(entry["ttl_s"], 0) for entry in keys.values()))


def measure(jobs: int, steps: int) -> dict[str, Any]:
    finished_ttl = Settings.model_fields["finished_ttl"].default
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        client = redis.Redis.from_url(server.url)
        storage = FileStorage(Path(tmp) / "store")
        ids = [run_job(client, storage, steps) for _ in range(jobs)]
        before = [keys_of(client, job_id) for job_id in ids]
        archiver = Archiver(client, JobArchive(storage, timedelta(days=7)), finished_ttl, batch_size=jobs)
        started = time.perf_counter()
        archived = archiver.run_once()
        archive_ms = (time.perf_counter() - started) * 1000 / max(archived, 1)
        after = [keys_of(client, job_id) for job_id in ids]
        objects = [len(storage.read(job_object_key(job_id))) for job_id in ids]
        client.close()

    def per_job(samples: list[dict[str, dict[str, int]]]) -> dict[str, Any]:
        return {
            "bytes": statistics.median(sum(e["bytes"] for e in keys.values()) for keys in samples),
            "residency_s": statistics.median(max(e["ttl_s"] for e in keys.values()) for keys in samples),
            "byte_seconds": statistics.median(byte_seconds(keys) for keys in samples),
            "example_keys": samples[0],
        }

    return {
        "jobs": jobs,
        "steps": steps,
        "archived": archived,
        "finished_ttl_s": int(finished_ttl.total_seconds()),
        "before_archive": per_job(before),
        "after_archive": per_job(after),
        "archive_object_bytes": statistics.median(objects),
        "archiver_ms_per_job": round(archive_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.archive_cost")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args()
    result = measure(args.jobs, args.steps)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
