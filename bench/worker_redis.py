"""``python -m bench.worker_redis``: Redis commands and Redis CPU per whole job, at a few step counts.

The Redis part of ``bench.service`` alone (``bench.redis_cost.job_cost`` and ``monitor_one_job`` on one
production-mode stack), so that the per-job cost can be compared between two checkouts in minutes: run this
file with ``PYTHONPATH`` pointing at each checkout in turn (the stack runs the code of the checkout whose
``devtools`` is imported). A GPU job's per-step work (cancel checks, progress writes) scales with its steps,
so the cost is measured at 4 steps (``bench.service``'s job) and at 40 (an SD3.5 Medium request).

Results go to ``bench/results/worker-redis-<label>.json`` (or ``--out``); BENCHMARKS.md records them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine_facts, write_results

SD35_STEP_S = 3.9 / 40  # an SD3.5 Medium request on one GPU: 40 steps x 1.75 images in ~3.9 s (issue #17)


def measure(tmp: Path, steps: list[tuple[int, int]], jobs: int, idle_s: float) -> dict[str, Any]:
    """Idle background, then for each (steps, size): ``jobs`` timed jobs and one monitored."""
    from bench import redis_cost
    from bench.stack import bench_stack

    out: dict[str, Any] = {}
    # A 40-step job on a busy shared CPU can outlast the default 60 s wait: waits of up to 5 minutes.
    redis_cost.WAIT_S = 300
    env = {"DARKROOM_WARMUP": "false", "DARKROOM_MAX_WAIT": "300"}
    with bench_stack(tmp / "stack", extra_env=env) as stack:
        with stack.client(timeout=90.0) as http:  # first job: model warm-up, script loads
            redis_cost._run_job(http, {**redis_cost.JOB_BODY, "seed": 1})
        background = redis_cost.idle_background(stack, idle_s)
        out["idle_per_s"] = background
        for count, size in steps:
            # Both functions read this body. A tiny-model step on this CPU (~0.1 s at 512x512 when the
            # machine is quiet) lasts about an SD3.5 step on a GPU: it sets how many progress writes happen.
            redis_cost.JOB_BODY.update(num_inference_steps=count, width=size, height=size)
            cost = redis_cost.job_cost(stack, jobs, background)
            monitored = redis_cost.monitor_one_job(stack)
            by_process = monitored["by_process"]
            out[f"steps_{count}"] = {
                "size": size,
                "job": cost,
                "monitor": {
                    "commands_total": monitored["commands_total"],
                    "worker_commands": sum(by_process.get("worker", {}).values()),
                    "by_process": by_process,
                    "sequence": monitored["sequence"],
                },
            }
            net = cost["net"]
            print(
                f"[bench] {count} steps: {net['commands']} commands/job, "
                f"{net['cpu_ms']:.3f} ms Redis CPU/job, "
                f"worker {out[f'steps_{count}']['monitor']['worker_commands']} commands (MONITOR)",
                flush=True,
            )
    return out


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_redis", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", default="4@512,40@512", help="comma-separated STEPS@SIZE (default 4@512,40@512)"
    )
    parser.add_argument("--jobs", type=int, default=5, help="timed jobs per step count (default 5)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle background measured, seconds")
    parser.add_argument("--loop-jobs", type=int, default=3, help="jobs of the step-loop phase (default 3)")
    parser.add_argument("--no-stack", action="store_true", help="only the step-loop phase")
    parser.add_argument("--label", default="run", help="name of this checkout in the results file name")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/worker-redis-LABEL)")
    args = parser.parse_args(argv)
    facts = machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="darkroom-bench-"))
    started = time.monotonic()
    try:
        plan = [(int(s.split("@")[0]), int(s.split("@")[1])) for s in args.steps.split(",")]
        results = {} if args.no_stack else measure(tmp, plan, args.jobs, args.idle_s)
        results["step_loop"] = {
            str(steps): step_loop(tmp, steps, SD35_STEP_S, args.loop_jobs) for steps, _ in plan
        }
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
