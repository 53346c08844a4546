"""``python -m bench.redis_primitives``: what the fleet design's Redis primitives cost a real redis-server,
measured before the code that uses them exists, so ``bench.fleet_sim --design fleet`` can rest on
measurements instead of guesses (issue #17).

Each primitive is sent the way a client sends it, one round trip per call (no pipelining across calls:
that would hide the per-request read, parse and reply work that dominates a cheap command), ``--calls``
times, against a private ``redis-server`` (devtools/redis_server.py) with AOF on, as the shipped stack runs
it. The cost is the server process's CPU (``INFO`` ``used_cpu_user + used_cpu_sys`` deltas) per call, minus
the idle server's own background over the same wall time; the time inside command handlers
(``INFO commandstats``) is recorded too. What is measured:

- ``heartbeat_zadd``: ``ZADD running <ms> <job key>`` moving an existing member of a 1,000-member ZSET
  (the extra command each heartbeat makes, one per running job); also ``hset_heartbeat`` alone and both in
  one ``MULTI``, for the marginal cost of adding the ZADD to a transaction the heartbeat already sends;
- ``zrangebyscore_<N>``: ``ZRANGEBYSCORE running -inf (<cutoff> LIMIT 0 100`` on an N-member ZSET
  (N = 1,000 and 10,000), nothing stale (what almost every pass sees) and 100 stale members;
- ``position_two_gets``: two ``GET``s in one round trip (a queued job's position from two counters);
- ``lease_set_nx_px_lost`` / ``_won``: ``SET lease <name> NX PX 15000`` when another holds it / when free;
- ``lease_pass_script_*``: one ``EVALSHA`` of a pass shaped like the new design's (read the lease; if ours,
  extend it and read the stale end of the running ZSET ``LIMIT 0 100``; if another's, stop): the
  non-holder's call every worker makes each heartbeat, and the holder's pass on 1,000 and 10,000 running;
- ``zset_bytes_per_member``: ``MEMORY USAGE`` of the 10,000-member running ZSET per member;
- ``lost_job_requeue``: what recovering one lost job costs with the shipped ``Lifecycle.requeue`` (the
  transition both designs' recovery asks for): a ``recover_lost_jobs`` pass that reads and requeues 100
  lost jobs, minus the next pass (nothing running any more: an empty read), per job. Jobs are written as
  the test fixtures write them (job hash, RQ job, claimed through the lifecycle).

Results: ``bench/results/redis-primitives.json``. Its ``fleet_sim_inputs`` object is read by
``bench.fleet_sim`` (see its docstring): per heartbeat ZADD, per position read, per lease try (the
non-holder's script call), per recovery pass (the holder's, 10,000 running, nothing stale) and per lost
job.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import structlog

from bench.common import machine_facts, write_results
from devtools.redis_server import RedisServer

RUNNING = "bench:running"
LEASE = "bench:recovery-lease"
COUNTERS = ("bench:queue:enqueued", "bench:queue:dequeued")
NOW_MS = 1_800_000_000_000
LOST_AFTER_MS = 30_000
PASS_LIMIT = 100

#: The shape of the new design's recovery pass: lease first, then the stale end of the running set.
_PASS = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif holder then
  return {0, {}}
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return {1, redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))}
"""


def cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_usec(client: redis.Redis) -> int:
    return sum(int(v["usec"]) for k, v in client.info("commandstats").items() if k != "cmdstat_info")


def idle_cpu_per_s(client: redis.Redis, seconds: float) -> float:
    """The server's own background CPU (cron, AOF fsync) per second of wall time, to subtract."""
    before, started = cpu_s(client), time.perf_counter()
    time.sleep(seconds)
    return (cpu_s(client) - before) / (time.perf_counter() - started)


def measure(
    client: redis.Redis, call: Callable[[], Any], calls: int, idle_per_s: float, repeats: int = 3
) -> dict[str, Any]:
    """Redis CPU per call of ``call`` (one round trip each), idle background subtracted; the median of
    ``repeats`` runs of ``calls`` calls (the machine is shared: one run can be slowed by a neighbour)."""
    for _ in range(min(200, calls)):  # warm the connection and the server's caches
        call()
    runs = []
    for _ in range(repeats):
        cpu_before, usec_before, started = cpu_s(client), command_usec(client), time.perf_counter()
        for _ in range(calls):
            call()
        wall = time.perf_counter() - started
        cpu = cpu_s(client) - cpu_before - idle_per_s * wall
        runs.append(
            (max(cpu, 0.0) * 1e6 / calls, (command_usec(client) - usec_before) / calls, wall * 1e6 / calls)
        )
    runs.sort()
    cpu_us, handler_us, round_trip_us = runs[len(runs) // 2]
    return {
        "calls": calls,
        "repeats": repeats,
        "cpu_us_per_call": round(cpu_us, 2),
        "cpu_us_per_call_runs": [round(r[0], 2) for r in runs],
        "command_usec_per_call": round(handler_us, 2),
        "client_round_trip_us": round(round_trip_us, 1),
    }


def fill_running(client: redis.Redis, members: int, stale: int) -> None:
    """A running ZSET of ``members`` job keys scored by last beat, ``stale`` of them older than the cutoff."""
    client.delete(RUNNING)
    chunk = 5000
    for first in range(0, members, chunk):
        scores = {
            f"darkroom:job:gen_{i:032x}": NOW_MS - (LOST_AFTER_MS * 2 if i < stale else i % 5000)
            for i in range(first, min(first + chunk, members))
        }
        client.zadd(RUNNING, scores)


def lost_job_requeue(url: str, lost: int = 100) -> dict[str, Any]:
    """Redis CPU to recover one lost job (read it, requeue it at the front through the lifecycle)."""
    from datetime import timedelta
    from typing import cast

    from rq import Queue
    from rq.serializers import JSONSerializer

    from schemas.generation import GenerationRequest
    from schemas.jobs import JobStatus
    from services.jobs import JobRecord, JobStore, Lifecycle, encode_fields, job_key, new_job_id, utcnow
    from services.jobs.recovery import recover_lost_jobs
    from services.rq_records import GENERATION_TASK

    client = redis.Redis.from_url(url)
    client.flushall()
    retention = timedelta(days=1)
    store, lifecycle = JobStore(client, retention), Lifecycle(client, retention)
    queue = Queue("darkroom", connection=client, serializer=JSONSerializer)
    request = (
        GenerationRequest(prompt="x", seed=1).normalized().model_dump(mode="json", exclude={"init_image"})
    )
    silent = utcnow() - timedelta(minutes=5)
    for _ in range(lost):
        record = JobRecord(id=new_job_id(), status=JobStatus.QUEUED, created_at=silent, request=request)
        client.hset(job_key(record.id), mapping=cast(Any, encode_fields(record.creation_fields())))
        queue.enqueue(GENERATION_TASK, record.id, job_id=record.id)
        client.lrem(queue.key, 0, record.id)  # dequeued by a worker that then died
        assert lifecycle.claim(record, "darkroom-dead-1", at=silent).applied

    def one_pass() -> tuple[float, int]:
        before = cpu_s(client)
        done = recover_lost_jobs(store, lifecycle, queue, lost_after=timedelta(seconds=30), max_attempts=3)
        return cpu_s(client) - before, len(done)

    with_lost, requeued = one_pass()
    # The same jobs are queued again, out of the running set: the next passes find nothing to read.
    reading = sorted(one_pass()[0] for _ in range(3))[1]
    client.flushall()
    client.close()
    return {
        "lost": lost,
        "requeued": requeued,
        "cpu_us_per_call": round(max(0.0, with_lost - reading) * 1e6 / max(requeued, 1), 2),
        "pass_cpu_ms_with_lost": round(with_lost * 1e3, 3),
        "pass_cpu_ms_empty": round(reading * 1e3, 3),
    }


def run(calls: int, idle_s: float = 2.0) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="darkroom-primitives-") as tmp,
        RedisServer(Path(tmp), appendonly=True) as server,
    ):
        client = redis.Redis.from_url(server.url)
        version = str(client.info("server")["redis_version"])
        idle = idle_cpu_per_s(client, idle_s)
        out: dict[str, Any] = {}
        cutoff = str(NOW_MS - LOST_AFTER_MS)

        fill_running(client, 1000, 0)
        job = "darkroom:job:gen_" + f"{500:032x}"
        client.hset(job, mapping={"status": "running", "heartbeat_at": "2026-12-02T20:00:00+00:00"})
        out["heartbeat_zadd"] = measure(client, lambda: client.zadd(RUNNING, {job: NOW_MS}), calls, idle)
        out["hset_heartbeat"] = measure(
            client, lambda: client.hset(job, "heartbeat_at", "2026-12-02T20:00:05+00:00"), calls, idle
        )

        def heartbeat_with_zadd() -> None:
            with client.pipeline(transaction=True) as pipe:
                pipe.hset(job, "heartbeat_at", "2026-12-02T20:00:05+00:00")
                pipe.zadd(RUNNING, {job: NOW_MS})
                pipe.execute()

        def heartbeat_alone() -> None:
            with client.pipeline(transaction=True) as pipe:
                pipe.hset(job, "heartbeat_at", "2026-12-02T20:00:05+00:00")
                pipe.execute()

        out["heartbeat_multi_without_zadd"] = measure(client, heartbeat_alone, calls, idle)
        out["heartbeat_multi_with_zadd"] = measure(client, heartbeat_with_zadd, calls, idle)

        script = client.register_script(_PASS)
        for members in (1000, 10_000):
            for stale in (0, PASS_LIMIT):
                fill_running(client, members, stale)
                out[f"zrangebyscore_{members}_stale_{stale}"] = measure(
                    client,
                    lambda: client.zrangebyscore(RUNNING, "-inf", f"({cutoff}", start=0, num=PASS_LIMIT),
                    calls,
                    idle,
                )
            fill_running(client, members, 0)
            client.set(LEASE, "holder", px=15_000)
            out[f"lease_pass_script_holder_{members}"] = measure(
                client,
                lambda: script(keys=[LEASE, RUNNING], args=["holder", 15_000, cutoff, PASS_LIMIT]),
                calls,
                idle,
            )
        out["zset_bytes_per_member"] = round(int(client.memory_usage(RUNNING) or 0) / 10_000, 1)
        out["lease_pass_script_non_holder"] = measure(
            client,
            lambda: script(keys=[LEASE, RUNNING], args=["other", 15_000, cutoff, PASS_LIMIT]),
            calls,
            idle,
        )
        out["lease_set_nx_px_lost"] = measure(
            client, lambda: client.set(LEASE, "other", nx=True, px=15_000), calls, idle
        )

        fresh = iter(range(10**9))  # a new lease key per call: every SET NX wins
        out["lease_set_nx_px_won"] = measure(
            client, lambda: client.set(f"{LEASE}:{next(fresh)}", "me", nx=True, px=15_000), calls, idle
        )

        client.mset({COUNTERS[0]: 1_234_567, COUNTERS[1]: 1_230_000})

        def position() -> None:
            with client.pipeline(transaction=False) as pipe:
                pipe.get(COUNTERS[0])
                pipe.get(COUNTERS[1])
                pipe.execute()

        out["position_two_gets"] = measure(client, position, calls, idle)
        client.close()
        out["lost_job_requeue"] = lost_job_requeue(server.url)
    return {"redis_version": version, "idle_cpu_us_per_s": round(idle * 1e6, 1), "primitives": out}


def fleet_sim_inputs(primitives: dict[str, Any]) -> dict[str, float]:
    """The costs bench.fleet_sim reads, from the primitives (see the module docstring for the choices)."""
    return {
        "redis_us_per_heartbeat_zadd": primitives["heartbeat_zadd"]["cpu_us_per_call"],
        "redis_us_per_position_read": primitives["position_two_gets"]["cpu_us_per_call"],
        "redis_us_per_lease_try": primitives["lease_pass_script_non_holder"]["cpu_us_per_call"],
        "redis_us_per_recovery_pass": primitives["lease_pass_script_holder_10000"]["cpu_us_per_call"],
        "redis_us_per_lost_job": primitives["lost_job_requeue"]["cpu_us_per_call"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.redis_primitives", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--calls", type=int, default=20_000, help="calls per primitive")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    # The recovery pass logs every requeue (a warning each): not what this report is about.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    measured = run(args.calls)
    results = {
        "machine": machine_facts(),
        **measured,
        "fleet_sim_inputs": fleet_sim_inputs(measured["primitives"]),
    }
    path = write_results("redis-primitives", results, args.out)
    print(f"redis {measured['redis_version']}, idle background {measured['idle_cpu_us_per_s']} us/s")
    for name, value in measured["primitives"].items():
        if isinstance(value, dict):
            print(
                f"  {name:<40} {value['cpu_us_per_call']:>8.2f} us CPU/call"
                + (
                    f"  ({value['command_usec_per_call']} us in handlers)"
                    if "command_usec_per_call" in value
                    else ""
                )
            )
        else:
            print(f"  {name:<40} {value}")
    print(f"fleet_sim_inputs: {results['fleet_sim_inputs']}\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
