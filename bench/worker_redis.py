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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_redis", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", default="4@512,40@512", help="comma-separated STEPS@SIZE (default 4@512,40@512)"
    )
    parser.add_argument("--jobs", type=int, default=5, help="timed jobs per step count (default 5)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle background measured, seconds")
    parser.add_argument("--label", default="run", help="name of this checkout in the results file name")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/worker-redis-LABEL)")
    args = parser.parse_args(argv)
    facts = machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="darkroom-bench-"))
    started = time.monotonic()
    try:
        plan = [(int(s.split("@")[0]), int(s.split("@")[1])) for s in args.steps.split(",")]
        results = measure(tmp, plan, args.jobs, args.idle_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    duration_s = round(time.monotonic() - started, 1)
    results = {"machine": facts, "label": args.label, "duration_s": duration_s, **results}
    path = write_results(f"worker-redis-{args.label}", results, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
