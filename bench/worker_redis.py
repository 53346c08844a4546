"""``python -m bench.worker_redis``: Redis's work for one whole job, end to end, at an SD3.5 job's 40 steps.

A whole job on a production-mode stack (API, GPU worker with the offline tiny model, webhook process,
Redis): the POST with ``Prefer: wait``, the worker's run, the ``completed`` webhook delivered to a loopback
receiver, the client's GET, and the archiver moving the record to storage and setting its TTLs — waited
for, so nothing is estimated. Per job: round trips (INFO ``total_reads_processed``), commands (INFO
``commandstats``: those inside Lua scripts too), Redis CPU (INFO ``used_cpu_*``), all with the idle
background subtracted; and one job under MONITOR, split by process and phase (``bench.job_phases``).
A tiny-model step at 512x512 (~0.1-0.2 s on the shared 2-vCPU VM) lasts about an SD3.5 step on a GPU
(~0.1 s): the job's length sets how many progress writes (at most one a second) it makes.

Comparing two checkouts: run this file with ``PYTHONPATH`` pointing at each in turn (the stack runs the
code of the checkout whose ``devtools`` is imported; copy this file, ``job_phases.py`` and
``redis_cost.py`` into the older one), alternate them, then ``--summarize`` the results files. Redis CPU
on a shared VM is noisy: round trips and commands are the stable figures. The per-step part alone, on a
scratch Redis, is ``step_loop`` (``--no-stack``).

Results go to ``bench/results/worker-redis-<label>.json`` (or ``--out``); BENCHMARKS.md records them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine_facts, write_results

SD35_STEP_S = 3.9 / 40  # an SD3.5 Medium request on one GPU: 40 steps x 1.75 images in ~3.9 s (issue #17)


def measure(
    tmp: Path,
    steps: list[tuple[int, int]],
    jobs: int,
    idle_s: float,
    webhook: bool = True,
    hz: int | None = None,
) -> dict[str, Any]:
    """Idle background, then for each (steps, size): ``jobs`` whole jobs timed, and one monitored.

    A whole job: POST with ``Prefer: wait`` and a ``completed`` webhook, the client's GET of the result,
    the webhook's delivery to a loopback receiver, and the archiver moving the record to storage and
    setting its TTLs — everything Redis does for the job, nothing estimated."""
    from bench import redis_cost
    from bench.stack import bench_stack

    out: dict[str, Any] = {}
    # A 40-step job on a busy shared CPU can outlast the default 60 s wait: waits of up to 5 minutes.
    redis_cost.WAIT_S = 300
    env = {"DARKROOM_WARMUP": "false", "DARKROOM_MAX_WAIT": "300"}
    with redis_cost.WebhookReceiver() as receiver, bench_stack(tmp / "stack", extra_env=env) as stack:
        archive_root = tmp / "stack" / "outputs"
        with stack.client(timeout=90.0) as http:  # first job: model warm-up, script loads
            whole_job(
                http, {**redis_cost.JOB_BODY, "seed": 1, "webhook_url": receiver.url}, receiver, archive_root
            )
        if hz is not None:
            # Redis's own cron (clients, expiry, AOF fsync) costs ~1-2.5 ms of CPU a second on this VM at
            # the default 10 Hz: against a job's few ms over its ~4 s, the noise of that background swamps
            # the net figure. It is a per-second cost of the server, not of any job: slowed while measuring.
            with stack.redis() as control:
                control.config_set("hz", hz)
            out["redis_hz"] = hz
        background = redis_cost.idle_background(stack, idle_s)
        out["idle_per_s"] = background
        for count, size in steps:
            # A tiny-model step on this CPU (~0.1 s at 512x512 when the machine is quiet) lasts about an
            # SD3.5 step on a GPU: it sets how many progress writes (at most one a second) a job makes.
            body = {**redis_cost.JOB_BODY, "num_inference_steps": count, "width": size, "height": size}
            if webhook:
                body["webhook_url"] = receiver.url
            client = stack.redis()
            walls = []
            with stack.client(timeout=90.0) as http:
                before = redis_cost.snapshot(client)
                for index in range(jobs):
                    walls.append(whole_job(http, {**body, "seed": 7000 + index}, receiver, archive_root))
                after = redis_cost.snapshot(client)
            client.close()
            raw = redis_cost.delta(before, after, per=jobs)
            net = redis_cost.subtract(raw, background, raw["wall_s"], jobs)
            monitored = monitor_whole_job(stack, {**body, "seed": 4242}, receiver, archive_root)
            out[f"steps_{count}"] = {
                "size": size,
                "job": {"jobs": jobs, "raw": raw, "net": net, "walls_s": walls},
                "monitor": monitored,
            }
            print_breakdown(count, net, monitored)
    return out


def whole_job(
    http: httpx.Client,
    body: dict[str, Any],
    receiver: Any,
    archive_root: Path,
    answered_hook: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One job from its POST (``Prefer: wait``) and GET to its archiving; its id, and seconds to the
    answer, the webhook and the archive. ``answered_hook`` runs between the POST's answer and the GET."""
    from bench import redis_cost
    from services.jobs.archive import job_object_key

    delivered = receiver.count
    started = time.perf_counter()
    response = http.post("/v1/generations", json=body, headers={"Prefer": f"wait={redis_cost.WAIT_S}"})
    job = response.json()
    if response.status_code != 200 or job.get("status") != "succeeded":
        raise RuntimeError(f"job did not succeed: HTTP {response.status_code} {job}")
    answered = time.perf_counter() - started
    if answered_hook is not None:
        answered_hook()
    http.get(f"/v1/generations/{job['id']}").raise_for_status()  # the client's read of the result
    if "webhook_url" in body and not receiver.wait_for(delivered + 1, timeout_s=60):
        raise RuntimeError("the webhook was not delivered within 60 s")
    hooked = time.perf_counter() - started
    archived_object = archive_root / job_object_key(job["id"])
    deadline = time.monotonic() + 60
    while not archived_object.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job['id']} was not archived within 60 s")
        time.sleep(0.05)
    archived = time.perf_counter() - started
    time.sleep(ARCHIVE_TRIM_S)  # the archiver's trim (one MULTI) follows the object's write
    return {
        "id": job["id"],
        "answer": round(answered, 3),
        "webhook": round(hooked, 3),
        "archived": round(archived, 3),
    }


#: After the archive object appears: time for the archiver's trim, which follows it within milliseconds.
ARCHIVE_TRIM_S = 0.3


def monitor_whole_job(stack: Any, body: dict[str, Any], receiver: Any, archive_root: Path) -> dict[str, Any]:
    """Every Redis command of one whole job, by process and phase (``bench.job_phases``)."""
    import redis as redis_lib

    from bench import job_phases, redis_cost

    marks: dict[str, float] = {}

    def mark_answer() -> None:  # the POST's answer on Redis's clock: what the API sends after is the GET
        with redis_lib.Redis.from_url(stack.redis_url) as marker:
            seconds, micros = marker.time()
        marks["post_done_at"] = seconds + micros / 1e6

    with stack.client(timeout=90.0) as http:
        http.get("/healthz")  # open the client connection before MONITOR starts
        monitor = redis_cost.Monitor(stack.redis_url, stack.cpu_roots()).start()
        walls = whole_job(http, body, receiver, archive_root, mark_answer)
        commands = monitor.stop()
    job_id = walls.pop("id")
    entries = job_phases.classify(commands, monitor.times, monitor.ports, job_id, marks["post_done_at"])
    return {
        "job_id": job_id,
        "walls_s": walls,
        "phases": job_phases.breakdown(entries),
        "sequence": [f"{e.process} [{e.phase}]: {e.line[:160]}" for e in entries if e.process != "other"],
    }


def print_breakdown(steps: int, net: dict[str, Any], monitored: dict[str, Any]) -> None:
    phases = monitored["phases"]
    print(
        f"[bench] {steps} steps, whole job: {net['commands']} commands, {net['round_trips']} round trips, "
        f"{net['cpu_ms']:.3f} ms Redis CPU per job (INFO, idle subtracted); MONITOR of one job: "
        f"{phases['total']['commands']} commands, ~{phases['total']['round_trips']} round trips",
        flush=True,
    )
    for process, rows in phases.items():
        if process == "total":
            continue
        for phase, row in rows.items():
            if phase == "total":
                continue
            print(
                f"  {process:9} {phase:12} {row['commands']:4} cmds {row['round_trips']:4} rt  "
                f"{row['by_command']}"
            )


def step_loop(tmp: Path, steps: int, step_s: float, jobs: int) -> dict[str, Any]:
    """The per-step part of a job alone, on a scratch Redis: the worker's own progress writes and cancel
    checks over ``steps`` steps of ``step_s`` seconds (an SD3.5 job's pace), as ``worker.runner`` makes
    them with the checkout's default ``progress_interval`` — deterministic where the whole-stack figure
    depends on how busy the shared CPU is. Redis's idle CPU over the same wall time is subtracted."""
    from datetime import timedelta

    import redis

    from bench import redis_cost
    from devtools.redis_server import RedisServer
    from schemas.generation import GenerationRequest
    from schemas.jobs import JobStatus
    from services.jobs import JobRecord, JobStore, Lifecycle, encode_fields, job_key, new_job_id, utcnow
    from services.settings import Settings
    from worker import runner

    interval = Settings.model_fields["progress_interval"].default
    request = GenerationRequest(prompt="x", seed=1).normalized()
    request_json = request.model_dump(mode="json", exclude={"init_image"})
    with RedisServer(tmp / "scratch-redis") as server:
        client = redis.Redis.from_url(server.url)
        store, lifecycle = JobStore(client, timedelta(days=1)), Lifecycle(client, timedelta(days=1))
        ctx = runner.WorkerContext(
            engine=None,  # type: ignore[arg-type]
            store=store,
            lifecycle=lifecycle,
            storage=None,  # type: ignore[arg-type]
            worker_name="bench-worker",
            progress_interval=interval,
        )
        watch = None
        if hasattr(ctx, "cancels"):  # cancel requests pushed, as ``worker.service.run_worker`` sets it up
            from worker.cancel_watch import CancelWatch

            watch = ctx.cancels = CancelWatch(client, lifecycle, "bench-worker")
            watch.start()
        records = []
        for _ in range(jobs):
            record = JobRecord(
                id=new_job_id(), status=JobStatus.QUEUED, created_at=utcnow(), request=request_json
            )
            client.hset(job_key(record.id), mapping=encode_fields(record.creation_fields()))  # type: ignore[arg-type]
            assert lifecycle.claim(record, "bench-worker").applied
            records.append(record)
        idle_before = redis_cost.snapshot(client)
        time.sleep(steps * step_s)
        idle = redis_cost.delta(idle_before, redis_cost.snapshot(client), per=1)
        before = redis_cost.snapshot(client)
        hooks_s = 0.0  # the worker's own time in the step hooks: what the GPU waits for between steps
        for record in records:
            if watch is not None:
                watch.watch(record.id)
            reporter = runner.ProgressReporter(ctx, record)
            should_cancel = runner.cancel_check(ctx, record.id)
            for step in range(1, steps + 1):
                time.sleep(step_s)  # the GPU's step
                started = time.perf_counter()
                assert not should_cancel()
                reporter(step, steps)
                hooks_s += time.perf_counter() - started
            if watch is not None:
                watch.forget(record.id)
        after = redis_cost.snapshot(client)
        if watch is not None:
            watch.close()
        client.close()
    raw = redis_cost.delta(before, after, per=jobs)
    net_cpu_ms = max(0.0, raw["cpu_ms"] - idle["cpu_ms"] * (raw["wall_s"] / jobs) / max(idle["wall_s"], 1e-9))
    return {
        "steps": steps,
        "step_s": step_s,
        "jobs": jobs,
        "progress_interval_s": interval.total_seconds(),
        "per_job": raw,
        "per_job_cpu_ms_idle_subtracted": round(net_cpu_ms, 4),
        "worker_hook_ms_per_job": round(hooks_s * 1000 / jobs, 3),
    }


def summarize(paths: list[Path]) -> dict[str, Any]:
    """Before/after pairs from alternated runs (labels ``e2e-{main|branch}-{hook|nohook}-{round}``): each
    run's whole-job figures, and per mode the medians and the branch/main ratios."""
    import json
    import statistics

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(paths):
        data = json.loads(path.read_text())
        _, side, mode, _ = str(data["label"]).split("-")
        for key, value in data.items():
            if not key.startswith("steps_"):
                continue
            net = value["job"]["net"]
            phases = value["monitor"]["phases"]
            runs.setdefault(mode, {}).setdefault(side, []).append(
                {
                    "file": path.name,
                    "git": data["machine"]["git"],
                    "date": data["machine"]["date"],
                    "load_average": data["machine"]["load_average"],
                    "steps_size": f"{key.removeprefix('steps_')}@{value['size']}",
                    "redis_hz": data.get("redis_hz"),
                    "answer_s": [w["answer"] for w in value["job"]["walls_s"]],
                    "round_trips": net["round_trips"],
                    "commands_incl_scripts": net["commands"],
                    "cpu_ms": net["cpu_ms"],
                    "command_usec": net["command_usec"],
                    "monitor_commands": phases["total"]["commands"],
                    "monitor_round_trips": phases["total"]["round_trips"],
                    "monitor_phases": {
                        process: {phase: [row["commands"], row["round_trips"]] for phase, row in rows.items()}
                        for process, rows in phases.items()
                        if process != "total"
                    },
                }
            )
    out: dict[str, Any] = {"runs": runs, "medians": {}, "ratios": {}}
    for mode, sides in runs.items():
        medians = {
            side: {
                key: round(statistics.median(r[key] for r in rows), 3)
                for key in (
                    "round_trips",
                    "commands_incl_scripts",
                    "cpu_ms",
                    "command_usec",
                    "monitor_commands",
                )
            }
            for side, rows in sides.items()
        }
        out["medians"][mode] = medians
        if {"main", "branch"} <= medians.keys():
            out["ratios"][mode] = {
                key: round(medians["branch"][key] / medians["main"][key], 3) for key in medians["main"]
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_redis", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="40@512", help="comma-separated STEPS@SIZE (default 40@512)")
    parser.add_argument("--jobs", type=int, default=5, help="timed jobs per step count (default 5)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle background measured, seconds")
    parser.add_argument("--loop-jobs", type=int, default=3, help="jobs of the step-loop phase (default 3)")
    parser.add_argument("--no-stack", action="store_true", help="only the step-loop phase")
    parser.add_argument("--no-loop", action="store_true", help="only the whole-job phase")
    parser.add_argument(
        "--no-webhook", action="store_true", help="jobs without a webhook (fleet_sim counts deliveries apart)"
    )
    parser.add_argument("--label", default="run", help="name of this checkout in the results file name")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/worker-redis-LABEL)")
    parser.add_argument("--hz", type=int, help="Redis's cron frequency while measuring (default: as started)")
    parser.add_argument("--summarize", nargs="+", type=Path, help="only summarize these results files")
    args = parser.parse_args(argv)
    if args.summarize:
        path = write_results("worker-redis-e2e", summarize(args.summarize), args.out)
        print(f"results: {path}")
        return 0
    facts = machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="darkroom-bench-"))
    started = time.monotonic()
    try:
        plan = [(int(s.split("@")[0]), int(s.split("@")[1])) for s in args.steps.split(",")]
        results = (
            {} if args.no_stack else measure(tmp, plan, args.jobs, args.idle_s, not args.no_webhook, args.hz)
        )
        results["step_loop"] = (
            {} if args.no_loop else {str(n): step_loop(tmp, n, SD35_STEP_S, args.loop_jobs) for n, _ in plan}
        )
        for steps, loop in results["step_loop"].items():
            print(
                f"[bench] step loop, {steps} steps of {SD35_STEP_S * 1000:.1f} ms: "
                f"{loop['per_job']['commands']} commands/job {loop['per_job']['by_command']}, "
                f"{loop['per_job_cpu_ms_idle_subtracted']:.3f} ms Redis CPU/job, "
                f"worker's step hooks {loop['worker_hook_ms_per_job']:.2f} ms/job",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    duration_s = round(time.monotonic() - started, 1)
    results = {"machine": facts, "label": args.label, "duration_s": duration_s, **results}
    path = write_results(f"worker-redis-{args.label}", results, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
