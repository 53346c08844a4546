"""What waiting for a replica (``DARKROOM_REDIS_MIN_REPLICA_ACKS=1``, Redis ``WAIT``) costs an admission and a
job's end, against not waiting, on a primary and a replica on loopback.

In-process, no HTTP: the admission script through ``Admitter`` on the API's asyncio client (sequential,
then ``--concurrency`` at once), and a job's end through ``Lifecycle.finish`` on the workers' sync
client. Rounds alternate acks 0 and 1 so that a neighbour's load hits both alike. On loopback the replica
is microseconds away; across availability zones add one network round trip per acknowledged write.

    python -m bench.replica_acks [--jobs 1000] [--rounds 3] [--concurrency 32]

Writes ``bench/results/replica-acks.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
import structlog

from bench.common import machine_facts, summary, write_results
from devtools.redis_server import RedisServer
from schemas.jobs import JobStatus
from services.admission import Admitter
from services.clients import make_async_redis, make_redis
from services.jobs import JobRecord, Lifecycle, new_job_id, utcnow
from services.jobs.outcome import Succeeded
from services.queue import generation_queue
from services.replication import ReplicaAcks
from services.settings import Settings

REQUEST = {"prompt": "a red fox", "width": 512, "height": 512, "seed": 7}


def _record() -> JobRecord:
    return JobRecord(
        id=new_job_id(), status=JobStatus.QUEUED, created_at=utcnow(), request=REQUEST, owner="bench"
    )


async def _admissions(url: str, acks: int, jobs: int, concurrency: int) -> dict[str, Any]:
    settings = Settings(
        auth_disabled=True,
        redis_url=url,
        redis_min_replica_acks=acks,
        max_queue_depth=10_000_000,
        queue_share_per_key=1,
    )
    client = make_async_redis(url, socket_timeout=10.0, max_connections=concurrency + 4)
    admitter = Admitter(client, generation_queue(make_redis(url), settings), settings, None)
    records = [_record() for _ in range(jobs)]
    try:
        sequential: list[float] = []
        for record in records[: jobs // 2]:
            started = time.perf_counter()
            await admitter.admit(record, "bench")
            sequential.append(time.perf_counter() - started)

        concurrent: list[float] = []

        async def one(record: JobRecord) -> None:
            started = time.perf_counter()
            await admitter.admit(record, "bench")
            concurrent.append(time.perf_counter() - started)

        rest = records[jobs // 2 :]
        wall = time.perf_counter()
        for start in range(0, len(rest), concurrency):
            await asyncio.gather(*(one(record) for record in rest[start : start + concurrency]))
        wall = time.perf_counter() - wall
    finally:
        await client.aclose()
    return {
        "sequential_ms": summary(sequential, 1000),
        f"concurrent_{concurrency}_ms": summary(concurrent, 1000),
        f"concurrent_{concurrency}_per_s": len(rest) / wall,
        "job_ids": [record.id for record in records],
    }


def _job_ends(url: str, acks: int, job_ids: list[str]) -> dict[str, Any]:
    client = make_redis(url)
    lifecycle = Lifecycle(client, timedelta(days=1), acks=ReplicaAcks(acks, 1000))
    now = utcnow()
    records = [
        JobRecord(id=job_id, status=JobStatus.QUEUED, created_at=now, request=REQUEST) for job_id in job_ids
    ]
    for record in records:  # left on their RQ queue: the status change is what is measured
        assert lifecycle.claim(record, "bench-worker").applied
    ends: list[float] = []
    for record in records:
        started = time.perf_counter()
        done = lifecycle.finish(record, "bench-worker", Succeeded(images=[]))
        ends.append(time.perf_counter() - started)
        assert done.applied
    client.close()
    return {"finish_ms": summary(ends, 1000)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="admissions per round and setting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    runs: dict[str, list[dict[str, Any]]] = {"acks_0": [], "acks_1": []}
    with tempfile.TemporaryDirectory() as tmp:
        primary = RedisServer(Path(tmp) / "primary", appendonly=True).start()
        replica = RedisServer(
            Path(tmp) / "replica", appendonly=True, replica_of=(primary.host, primary.port)
        ).start()
        try:
            with redis.Redis.from_url(primary.url) as probe:
                probe.set("bench:probe", "1")
                deadline = time.monotonic() + 10
                while probe.wait(1, 100) < 1:
                    assert time.monotonic() < deadline, "replica never in sync"
                    probe.set("bench:probe", "1")
            for _ in range(args.rounds):
                for acks in (0, 1):
                    admitted = asyncio.run(_admissions(primary.url, acks, args.jobs, args.concurrency))
                    ended = _job_ends(primary.url, acks, admitted.pop("job_ids"))
                    runs[f"acks_{acks}"].append({**admitted, **ended})
                    with redis.Redis.from_url(primary.url) as flush:
                        flush.flushall()
        finally:
            replica.stop()
            primary.stop()
    results = {
        "command": "python -m bench.replica_acks "
        f"--jobs {args.jobs} --rounds {args.rounds} --concurrency {args.concurrency}",
        "machine": machine_facts(),
        "runs": runs,
    }
    path = write_results("replica-acks", results, args.out)
    for setting, rounds in runs.items():
        for index, run in enumerate(rounds):
            print(
                f"{setting} round {index}: admit p50 {run['sequential_ms']['p50']:.3f} ms "
                f"p99 {run['sequential_ms']['p99']:.3f} ms; "
                f"concurrent p50 {run[f'concurrent_{args.concurrency}_ms']['p50']:.2f} ms, "
                f"{run[f'concurrent_{args.concurrency}_per_s']:.0f}/s; "
                f"finish p50 {run['finish_ms']['p50']:.3f} ms p99 {run['finish_ms']['p99']:.3f} ms"
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
