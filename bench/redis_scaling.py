"""What the two per-fleet costs of issue #17 cost Redis now, on a throwaway redis-server: a lost-job recovery
pass, and reading a queued job's position. Both must stay flat as the fleet grows.

- **Recovery pass** with ``running`` jobs running and one lost: the commands the pass issues (``INFO
  commandstats`` delta, commands called inside scripts included) and their Redis time (``usec``), for the
  lease holder's pass and for every other worker's (which only learns it does not hold the lease). Run at
  two fleet sizes: the counts must be equal (O(lost), not O(running)).
- **Queue position** at depth 1 and at depth ``depth``: the ``HMGET`` of the queue's order counters that
  the API now runs (``services.queue_order``), against the ``LPOS`` it ran before, at the same places.

Jobs are written straight into Redis in the layout admission and the claim write (hash, running-set score,
queue list, order counters), so a 10,000-job fleet or a 100,000-deep queue is seeded in seconds.

    python -m bench.redis_scaling                     # 1,000 vs 10,000 running; depth 1 vs 100,000
    python -m bench.redis_scaling --out bench/results/redis-scaling.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio as aredis
import structlog
from rq import Queue
from rq.serializers import JSONSerializer

from devtools.redis_server import RedisServer
from schemas.generation import GenerationRequest
from schemas.jobs import JobStatus
from services import queue_order
from services.jobs import JobRecord, JobStore, Lifecycle, encode_fields, job_key, utcnow
from services.jobs.keys import RUNNING_SET, queue_order_key
from services.jobs.records import beat_ms
from services.jobs.recovery import RecoveryLease, recover_lost_jobs

LOST_AFTER = timedelta(seconds=20)
QUEUE = "darkroom"
REQUEST = GenerationRequest(prompt="a lighthouse at dusk", seed=1).normalized().model_dump(mode="json")


def _calls(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """``{command: (calls, usec)}`` from ``INFO commandstats``."""
    stats = cast(dict[str, dict[str, int]], client.info("commandstats"))
    return {key.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for key, v in stats.items()}


def _delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Commands and their Redis time between two snapshots, less the ``INFO`` that took the second."""
    by_command: dict[str, int] = {}
    usec: dict[str, int] = {}
    for name, (calls, spent) in after.items():
        was_calls, was_usec = before.get(name, (0, 0))
        if name == "info":
            continue
        if calls > was_calls:
            by_command[name] = calls - was_calls
            usec[name] = spent - was_usec
    return {
        "commands": sum(by_command.values()),
        "by_command": by_command,
        "command_usec": sum(usec.values()),
        "hmget_usec": usec.get("hmget", 0),
    }


def _running_record(index: int, heartbeat_s_ago: float) -> dict[str, str]:
    moment = utcnow() - timedelta(seconds=heartbeat_s_ago)
    record = JobRecord(
        id=f"gen_{index:032x}", status=JobStatus.RUNNING, created_at=moment, request=REQUEST, owner="bench"
    )
    fields = encode_fields(
        {**record.creation_fields(), "started_at": moment, "heartbeat_at": moment, "worker": "darkroom-w"}
    )
    return {**fields, "status": "running", "beat_ms": beat_ms(moment)}


def seed_fleet(client: redis.Redis, running: int) -> None:
    """``running`` healthy running jobs (beaten a second ago), each in the running set scored by its
    heartbeat, as the claim and the beats leave them."""
    client.flushall()
    chunk = 1000
    for start in range(0, running, chunk):
        with client.pipeline(transaction=False) as pipe:
            for index in range(start, min(start + chunk, running)):
                fields = _running_record(index, 1.0)
                pipe.hset(job_key(f"gen_{index:032x}"), mapping=fields)  # type: ignore[arg-type]
                pipe.zadd(RUNNING_SET, {job_key(f"gen_{index:032x}"): int(fields["beat_ms"])})
            pipe.execute()


def lose_one(client: redis.Redis, index: int) -> str:
    """One more running job, silent for a minute (its worker died); its id."""
    lost = f"gen_{index:032x}"
    fields = _running_record(index, 60.0)
    client.hset(job_key(lost), mapping=fields)  # type: ignore[arg-type]
    client.zadd(RUNNING_SET, {job_key(lost): int(fields["beat_ms"])})
    return lost


def recovery_pass(client: redis.Redis, running: int, passes: int = 10) -> dict[str, Any]:
    """Passes by the lease holder with ``running`` running jobs and one lost each time, and passes by another
    worker (which only learns that it does not hold the lease); per pass. ``command_usec`` sums every
    command's ``usec``: a script's own figure includes the commands it calls, so it is an upper bound."""
    seed_fleet(client, running)
    store = JobStore(client, timedelta(days=1))
    lifecycle = Lifecycle(client, timedelta(days=1))
    queue = Queue(QUEUE, connection=client, serializer=JSONSerializer)
    holder = RecoveryLease(client, "darkroom-holder", timedelta(seconds=15))
    other = RecoveryLease(client, "darkroom-other", timedelta(seconds=15))
    # A first lost job and its pass load the scripts (SCRIPT LOAD on first use), as in a long-running
    # worker; the second is measured.
    lose_one(client, running)
    recover_lost_jobs(store, lifecycle, queue, lost_after=LOST_AFTER, max_attempts=3, lease=holder)
    holder_costs, walls = [], []
    for rep in range(passes):
        lost = lose_one(client, running + 1 + rep)
        before = _calls(client)
        started = time.perf_counter()
        done = recover_lost_jobs(store, lifecycle, queue, lost_after=LOST_AFTER, max_attempts=3, lease=holder)
        walls.append((time.perf_counter() - started) * 1000)
        holder_costs.append(_delta(before, _calls(client)))
        assert [(d.job_id, d.action) for d in done] == [(lost, "requeued")], done
    before = _calls(client)
    for _ in range(passes):
        assert not recover_lost_jobs(
            store, lifecycle, queue, lost_after=LOST_AFTER, max_attempts=3, lease=other
        )
    other_cost = _delta(before, _calls(client))
    assert all(cost["by_command"] == holder_costs[0]["by_command"] for cost in holder_costs)
    return {
        "running": running,
        "lost_per_pass": 1,
        "passes": passes,
        "lease_holder_pass": {
            "commands": holder_costs[0]["commands"],
            "by_command": holder_costs[0]["by_command"],
            "command_usec": round(sum(cost["command_usec"] for cost in holder_costs) / passes, 1),
            "client_wall_ms": round(sorted(walls)[len(walls) // 2], 2),
        },
        "other_worker_pass": {
            "commands": other_cost["commands"] / passes,
            "by_command": {name: calls / passes for name, calls in other_cost["by_command"].items()},
            "command_usec": round(other_cost["command_usec"] / passes, 1),
        },
    }


def _seed_queue(client: redis.Redis, depth: int) -> list[str]:
    """A queue ``depth`` deep, each job numbered as admission numbers it, none claimed yet."""
    client.flushall()
    queue_key = f"rq:queue:{QUEUE}"
    order_key = queue_order_key(queue_key)
    ids = [f"gen_{i:032x}" for i in range(depth)]
    chunk = 10_000
    for start in range(0, depth, chunk):
        client.rpush(queue_key, *ids[start : start + chunk])
    client.hset(order_key, mapping={"pushed": depth, "claimed": 0, "gap_ms": "250.0"})
    for seq, job_id in ((1, ids[0]), (depth, ids[-1])):
        client.hset(job_key(job_id), mapping={"queue_seq": seq, "queue_order": order_key})
    return ids


async def _read_positions(url: str, order_key: str, seq: int, calls: int) -> list[int]:
    client = aredis.Redis.from_url(url)
    try:
        return [(await queue_order.read_order_async(client, order_key)).position(seq) for _ in range(calls)]
    finally:
        await client.aclose()


def queue_position(client: redis.Redis, url: str, depth: int, calls: int) -> dict[str, Any]:
    """The position read at the front (1) and the back (``depth``) of a ``depth``-deep queue: now (one
    ``HMGET`` of the order counters) and before (``LPOS``), per read."""
    ids = _seed_queue(client, depth)
    queue_key = f"rq:queue:{QUEUE}"
    order_key = queue_order_key(queue_key)
    out: dict[str, Any] = {"depth": depth, "reads": calls, "by_position": {}}
    for position, job_id in ((1, ids[0]), (depth, ids[-1])):
        before = _calls(client)
        found = asyncio.run(_read_positions(url, order_key, position, calls))
        now = _delta(before, _calls(client))
        assert set(found) == {position}, (position, set(found))
        before = _calls(client)
        with client.pipeline(transaction=False) as pipe:
            for _ in range(calls):
                pipe.lpos(queue_key, job_id)
            pipe.execute()
        old = _delta(before, _calls(client))
        # The async client's connection handshake (HELLO, CLIENT SETINFO) is not part of a read.
        hmget_calls = now["by_command"].get("hmget", 0)
        out["by_position"][str(position)] = {
            "now_hmget": {
                "commands_per_read": hmget_calls / calls,
                "usec_per_read": round(now["hmget_usec"] / calls, 3),
                "connection_setup_commands": now["commands"] - hmget_calls,
            },
            "before_lpos": {
                "commands_per_read": old["commands"] / calls,
                "usec_per_read": round(old["command_usec"] / calls, 3),
            },
        }
    return out


def run(fleets: list[int], depths: list[int], reads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch, RedisServer(Path(scratch)) as server:
        client = redis.Redis.from_url(server.url)
        version = client.info("server")["redis_version"]
        results = {
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
            "redis_version": version,
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "recovery_pass": [recovery_pass(client, running) for running in fleets],
            "queue_position": [queue_position(client, server.url, depth, reads) for depth in depths],
        }
        client.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--fleets", type=int, nargs="+", default=[1000, 10_000], help="running jobs")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 100_000], help="queue depths")
    parser.add_argument("--reads", type=int, default=200, help="position reads per place measured")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args(argv)
    # Each requeue logs a warning: not what this report is about (stdout is the JSON).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    results = run(args.fleets, args.depths, args.reads)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
