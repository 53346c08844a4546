"""``python -m bench.job_replay``: Redis's CPU for one whole job when a fleet's worth of jobs share it.

``bench.worker_redis`` measures a job alone: Redis wakes for each of its ~27 round trips, reads one
request, appends it to the AOF and writes one reply. At a fleet's peak (~365 admissions a second, 1,000
workers, ~10,000 round trips a second) each wake-up serves several clients, so each round trip costs Redis
less: on this VM a plain ``HSET`` costs ~23-30 us of Redis CPU sent by one client at a time and ~8 us
from 64 clients at once. ``bench.fleet_sim`` asks what a job costs at that peak, so this bench measures it
there, with nothing estimated:

1. **Capture**: a production-mode stack (API, GPU worker with the offline tiny model, webhook process with
   the archiver, Redis with AOF) runs one whole job — POST with ``Prefer: wait``, the worker's run, the
   client's GET, the archiver's archive and trim — under ``MONITOR``; every command's exact arguments, its
   process (by client port) and phase (``bench.job_phases``) are kept. What every process sends whether or
   not a job runs (``background``) is left out: fleet_sim charges it per worker and per second.
2. **Replay**: the stack's processes stop; its Redis, which has our Lua scripts cached, is flushed. The job's
   round trips (pipelines and MULTI blocks as they arrived) are sent again for ``--jobs`` jobs, each under
   fresh ids, paced at ``--rate`` jobs a second, from one connection pool per process as the services hold
   them: Redis runs the very scripts and commands the job ran, on the same data shapes. A blocking read
   (``Prefer: wait``'s ``XREAD BLOCK``) is sent on a pool of its own and answered when the replayed job's
   end arrives, as in the service; the dequeue's ``BLPOP`` finds the queue non-empty (each job pushed
   itself before), as at a fleet's peak.
3. **Measure**: Redis's CPU (``INFO`` ``used_cpu_user + used_cpu_sys``), round trips
   (``total_reads_processed``) and commands over the replay, minus the idle server's own background.

The replay runs twice per round, once with the job's progress writes and once without, so a job's cost
splits into its fixed part and a cost per progress write (an SD3.5 job makes one a second: fleet_sim
counts them from its scenario). The replayed commands are the live job's: commands per job match
``bench.worker_redis``'s count. So does Redis's CPU when the replay is spaced as the live job was
(``--as-captured``: one job at a time, each round trip at its captured moment): a job alone pays for each
round trip waking an idle Redis, which a busy one does not. ``--rate 0`` replays one job after another,
back to back.

Comparing two checkouts: run with ``PYTHONPATH`` pointing at each (the capture runs the code of the
checkout whose ``devtools`` is imported; copy this file and ``job_phases.py`` into the older one).
Results: ``bench/results/job-replay-<label>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis

from bench.common import machine_facts, write_results

#: Phases of a job (``bench.job_phases``) whose commands are the job's own.
JOB_PHASES = ("submit", "prefer_wait", "get", "claim", "steps", "heartbeat", "finish", "archive", "webhook")
#: A Prefer: wait lease's member in the waits set (``api.waits``: ``<process>:<n>``): unique per wait.
_LEASE_ID = re.compile(rb"^[0-9a-f]{12}:\d+$")
#: Jobs being replayed at once, at most (each holds at most two blocking reads).
IN_FLIGHT = 512
#: The progress script's number of keys (services.jobs.lifecycle._PROGRESS).
_PROGRESS_KEYS = (b"3",)


@dataclass
class Trip:
    """One round trip of the job: its process, phase, and commands (a pipeline or a MULTI block)."""

    process: str
    phase: str
    commands: list[list[bytes]]
    blocking: bool = False
    #: Seconds after the job's first round trip that this one arrived (``--as-captured`` keeps them).
    at: float = 0.0

    @property
    def progress_write(self) -> bool:
        """The worker's progress script (``Lifecycle.progress``): fleet_sim counts these per second."""
        first = self.commands[0]
        return (
            self.phase == "steps"
            and first[0].upper() == b"EVALSHA"
            and first[2] in _PROGRESS_KEYS
            and first[3].startswith(b"darkroom:job:")
        )


@dataclass
class Capture:
    job_id: str
    trips: list[Trip]
    phases: dict[str, Any] = field(default_factory=dict)

    def without_progress(self) -> list[Trip]:
        return [trip for trip in self.trips if not trip.progress_write]

    @property
    def progress_writes(self) -> int:
        return sum(trip.progress_write for trip in self.trips)


def capture(tmp: Path, steps: int, size: int) -> tuple[Capture, Any]:
    """One whole job under ``MONITOR`` on a fresh production-mode stack; the stack, still running."""
    from bench import job_phases, redis_cost
    from bench.stack import bench_stack
    from bench.worker_redis import whole_job

    redis_cost.WAIT_S = 300
    env = {"DARKROOM_WARMUP": "false", "DARKROOM_MAX_WAIT": "300"}
    stack = bench_stack(tmp / "stack", extra_env=env).start()
    try:
        archive_root = tmp / "stack" / "outputs"
        body = {**redis_cost.JOB_BODY, "num_inference_steps": steps, "width": size, "height": size}
        with redis_cost.WebhookReceiver() as receiver, stack.client(timeout=300.0) as http:
            whole_job(http, {**body, "seed": 1}, receiver, archive_root)  # warm-up: model, script loads
            marks: dict[str, float] = {}

            def mark_answer() -> None:
                with redis.Redis.from_url(stack.redis_url) as marker:
                    seconds, micros = marker.time()
                marks["post_done_at"] = seconds + micros / 1e6

            http.get("/healthz")
            monitor = redis_cost.Monitor(stack.redis_url, stack.cpu_roots()).start()
            walls = whole_job(http, {**body, "seed": 2}, receiver, archive_root, mark_answer)
            monitor.stop()
        job_id = walls["id"]
        # A script's own calls are no round trips: the replayed script makes them again.
        sent = [c for c in monitor.captured if not c.lua]
        lines = [(monitor.owners.get(c.port, "other"), c.line) for c in sent]
        entries = job_phases.classify(
            lines, [c.at for c in sent], [c.port for c in sent], job_id, marks["post_done_at"]
        )
        by_entry = {id(entry): sent[index] for index, entry in enumerate(entries)}
        trips: list[Trip] = []
        for group in job_phases.round_trips(entries):
            first = group[0]
            if first.phase not in JOB_PHASES:
                continue
            commands = [by_entry[id(entry)].args for entry in group]
            verb = commands[0][0].upper()
            blocking = verb in {b"XREAD", b"BLPOP", b"BRPOP", b"BLMOVE"}
            trips.append(Trip(first.process, first.phase, commands, blocking, by_entry[id(first)].at))
        start = trips[0].at if trips else 0.0
        for trip in trips:
            trip.at -= start
        return Capture(job_id, trips, job_phases.breakdown(entries)), stack
    except BaseException:
        stack.close()
        raise


# --- the replay --------------------------------------------------------------------------------------------


def substituted(trips: list[Trip], job_id: str, index: int) -> Iterator[Trip]:
    """The job's trips under a fresh job id (same length) and fresh wait-lease ids, for replay ``index``."""
    fresh = f"{job_id[:-12]}{index:012x}".encode()
    old = job_id.encode()
    for trip in trips:
        commands = []
        for command in trip.commands:
            args = []
            for arg in command:
                if old in arg:
                    arg = arg.replace(old, fresh)
                elif _LEASE_ID.match(arg):
                    arg = arg.split(b":")[0] + b":" + str(index).encode()
                args.append(arg)
            if args[0].upper() == b"BLPOP":  # the queue holds this job's own push at least: never waits
                args[-1] = b"1"
            commands.append(args)
        yield Trip(trip.process, trip.phase, commands, trip.blocking, trip.at)


async def send(client: aredis.Redis, trip: Trip) -> None:
    commands = trip.commands
    if len(commands) == 1:
        await client.execute_command(*commands[0])
        return
    transaction = commands[0][0].upper() == b"MULTI" and commands[-1][0].upper() == b"EXEC"
    inner = commands[1:-1] if transaction else commands
    async with client.pipeline(transaction=transaction) as pipe:
        for command in inner:
            pipe.execute_command(*command)
        await pipe.execute(raise_on_error=False)


async def replay(
    url: str,
    trips: list[Trip],
    job_id: str,
    jobs: int,
    rate: float,
    connections: int,
    warmup: int,
    spaced: bool = False,
) -> tuple[dict[str, float], dict[str, float], float]:
    """Replay ``warmup`` jobs (unmeasured: the pools open their connections, as long-lived services' pools
    have), then ``jobs`` jobs at ``rate`` a second (0: one after another); Redis's counters before and
    after those, and the wall time they took. ``spaced``: jobs one after another, each round trip at its
    captured moment in the job, as the live job sent them."""
    processes = {trip.process for trip in trips}
    # No read timeout: a blocking read may wait its whole BLOCK, and a pool may queue for a while.
    pools = {
        name: aredis.Redis(
            connection_pool=aredis.BlockingConnectionPool.from_url(
                url, max_connections=connections, timeout=None, socket_timeout=None
            )
        )
        for name in processes
    }
    blocking = aredis.Redis(
        connection_pool=aredis.BlockingConnectionPool.from_url(
            url, max_connections=IN_FLIGHT + 16, timeout=None, socket_timeout=None
        )
    )
    # A rate this client cannot reach must not pile up jobs without bound: it then runs as fast as it can.
    in_flight = asyncio.Semaphore(IN_FLIGHT)

    async def one(index: int) -> None:
        async with in_flight:
            waiting: list[asyncio.Task[None]] = []
            began = time.perf_counter()
            for trip in substituted(trips, job_id, index):
                if spaced and (delay := began + trip.at - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                if trip.blocking:
                    waiting.append(asyncio.create_task(send(blocking, trip)))
                    await asyncio.sleep(0)  # sent before the job goes on, as the API's wait is
                else:
                    await send(pools[trip.process], trip)
            await asyncio.gather(*waiting)

    async def run(first: int, count: int) -> float:
        started = time.perf_counter()
        if rate <= 0 or spaced:
            for index in range(first, first + count):
                await one(index)
        else:
            tasks = []
            for n, index in enumerate(range(first, first + count)):
                delay = started + n / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(index)))
            await asyncio.gather(*tasks)
        return time.perf_counter() - started

    control = aredis.Redis.from_url(url, socket_timeout=None)
    await run(jobs, warmup)
    before = await counters(control)
    wall = await run(0, jobs)
    after = await counters(control)
    for client in [*pools.values(), blocking, control]:
        await client.aclose()
    return before, after, wall


async def counters(client: aredis.Redis) -> dict[str, float]:
    cpu, stats = await client.info("cpu"), await client.info("stats")
    return {
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "round_trips": float(stats["total_reads_processed"]),
        "commands": float(stats["total_commands_processed"]),
        "at": time.monotonic(),
    }


def measure_replay(
    client: redis.Redis,
    url: str,
    trips: list[Trip],
    job_id: str,
    args: argparse.Namespace,
    idle_cpu_per_s: float,
) -> dict[str, Any]:
    """One replay on a flushed Redis (its scripts stay cached): per-job CPU, round trips, commands."""
    client.flushall()
    before, after, wall = asyncio.run(
        replay(url, trips, job_id, args.jobs, args.rate, args.connections, args.warmup, args.as_captured)
    )
    jobs = args.jobs
    elapsed = after["at"] - before["at"]
    cpu_ms = (after["cpu_s"] - before["cpu_s"] - idle_cpu_per_s * elapsed) * 1000.0
    return {
        "jobs": jobs,
        "wall_s": round(wall, 3),
        "jobs_per_s": round(jobs / wall, 1),
        "round_trips_per_s": round((after["round_trips"] - before["round_trips"]) / wall, 0),
        "cpu_ms_per_job": round(cpu_ms / jobs, 4),
        "round_trips_per_job": round((after["round_trips"] - before["round_trips"]) / jobs, 2),
        "commands_per_job": round((after["commands"] - before["commands"]) / jobs, 2),
        "redis_busy_share": round(cpu_ms / 1000.0 / elapsed, 3),
    }


def idle_cpu(client: redis.Redis, seconds: float) -> float:
    """The idle server's own CPU a second (its cron: expiry, clients, AOF fsync)."""

    def cpu_s() -> float:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    started, before = time.monotonic(), cpu_s()
    time.sleep(seconds)
    return (cpu_s() - before) / (time.monotonic() - started)


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    captured, stack = capture(tmp, args.steps, args.size)
    try:
        for name in list(stack.processes):  # Redis alone now: its script cache keeps our scripts
            stack.stop(name)
        client = stack.redis()
        client.config_set("hz", args.hz)
        idle = idle_cpu(client, args.idle_s)
        plans = {"with_progress": captured.trips, "without_progress": captured.without_progress()}
        if args.as_captured:  # the live job's spacing: its cost alone, beside bench.worker_redis's
            del plans["without_progress"]
        rounds: list[dict[str, Any]] = []
        for round_index in range(args.rounds):
            row: dict[str, Any] = {}
            for name, trips in plans.items():
                row[name] = measure_replay(client, stack.redis_url, trips, captured.job_id, args, idle)
                print(f"[bench] round {round_index + 1} {name}: {row[name]}", flush=True)
            rounds.append(row)
        client.close()
    finally:
        stack.close()
    writes = captured.progress_writes

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

    whole = median([r["with_progress"]["cpu_ms_per_job"] for r in rounds])
    without = [r["without_progress"]["cpu_ms_per_job"] for r in rounds if "without_progress" in r]
    fixed = median(without) if without else whole
    per_write = (whole - fixed) / writes if writes else 0.0
    return {
        "capture": {
            "job_id": captured.job_id,
            "steps": args.steps,
            "size": args.size,
            "round_trips": len(captured.trips),
            "progress_writes": writes,
            "phases": captured.phases,
            "trips": [
                {"process": t.process, "phase": t.phase, "commands": [c[0].decode() for c in t.commands]}
                for t in captured.trips
            ],
        },
        "replay": {
            "rate_jobs_per_s": args.rate,
            "connections": args.connections,
            "warmup_jobs": args.warmup,
            "as_captured": args.as_captured,
            "redis_hz": args.hz,
            "idle_cpu_ms_per_s": round(idle * 1000, 4),
        },
        "rounds": rounds,
        "per_job": {
            "cpu_ms_with_captured_progress": round(whole, 4),
            "cpu_ms_fixed": round(fixed, 4),
            "cpu_ms_per_progress_write": round(per_write, 4),
            "captured_progress_writes": writes,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.job_replay", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="jobs replayed per measurement (default 3000)")
    parser.add_argument(
        "--rate",
        type=float,
        default=365.0,
        help="jobs started a second (default 365: fleet_sim's peak); 0: one after another",
    )
    parser.add_argument(
        "--connections", type=int, default=64, help="connections per process pool (default 64)"
    )
    parser.add_argument("--warmup", type=int, default=500, help="unmeasured jobs first (default 500)")
    parser.add_argument(
        "--as-captured",
        action="store_true",
        help="jobs one at a time, each round trip at its captured moment (with --jobs 5 --warmup 1 --hz 1: "
        "the job alone, as bench.worker_redis measures it)",
    )
    parser.add_argument("--hz", type=int, default=10, help="Redis's cron frequency while replaying")
    parser.add_argument("--rounds", type=int, default=3, help="alternating with/without-progress rounds")
    parser.add_argument("--steps", type=int, default=40, help="the captured job's steps (default 40)")
    parser.add_argument("--size", type=int, default=512, help="the captured job's width and height")
    parser.add_argument("--idle-s", type=float, default=3.0, help="idle Redis measured, seconds")
    parser.add_argument("--label", default="run", help="name of this checkout in the results file name")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/job-replay-LABEL.json)")
    args = parser.parse_args(argv)
    facts = machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="darkroom-replay-"))
    started = time.monotonic()
    try:
        results = measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = {
        "machine": facts,
        "label": args.label,
        "duration_s": round(time.monotonic() - started, 1),
        **results,
    }
    path = write_results(f"job-replay-{args.label}", results, args.out)
    print(f"[bench] per job: {results['per_job']}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
