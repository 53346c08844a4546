"""``python -m bench.service``: every CPU benchmark of the service, on one real stack, with PASS/FAIL bars.

Phases, in order (each bounded in count and time):
1. service overhead: direct engine call vs the whole service, interleaved pairs (``bench.overhead``);
2. Redis cost: idle background, whole jobs with and without a webhook, MONITOR of one job, memory kept per
   job (``bench.redis_cost``);
3. the GPU worker is stopped; for each uvicorn worker count: submissions/s (closed loop), then GET latency
   at a fixed rate (open loop) and GET saturation (``bench.api_load``);
4. microbenchmarks on a scratch Redis: one lost-job recovery pass with N jobs running, LPOS by queue depth.

Results go to ``bench/results/service.json`` (or ``--out``); BENCHMARKS.md records them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Bar, machine_facts, print_bars, wait_for_quiet, write_results

TARGET_OVERHEAD_MS = 25.0
TARGET_SUBMISSIONS_PER_S = 1000.0
TARGET_GET_P99_MS = 20.0
TARGET_GET_RATE = 300.0


@dataclass
class Plan:
    pairs: int = 40
    warmup_pairs: int = 3
    redis_jobs: int = 10
    idle_s: float = 10.0
    monitor_idle_s: float = 6.0
    api_workers: tuple[int, ...] = (1, 2)
    concurrency: int = 32
    submissions: int = 8000
    submit_s: float = 20.0
    submit_warmup: int = 300
    backlog: int = 1000
    get_rate: float = TARGET_GET_RATE
    get_s: float = 20.0
    get_saturation_s: float = 8.0
    recovery_running: int = 1000
    recovery_passes: int = 10
    lpos_length: int = 100_000
    lpos_positions: tuple[int, ...] = (1, 1_000, 10_000, 100_000)

    @classmethod
    def quick(cls) -> Plan:
        """Everything once, tiny: for the smoke test (shape of the results, not their values)."""
        return cls(
            pairs=1,
            warmup_pairs=0,
            redis_jobs=1,
            idle_s=1.0,
            monitor_idle_s=0.5,
            api_workers=(1,),
            concurrency=4,
            submissions=60,
            submit_s=5.0,
            submit_warmup=5,
            backlog=20,
            get_rate=40.0,
            get_s=1.0,
            get_saturation_s=0.5,
            recovery_running=20,
            recovery_passes=2,
            lpos_length=2_000,
            lpos_positions=(1, 1_000, 2_000),
        )


def run_all(plan: Plan, tmp: Path, quick: bool = False, engine: Any = None) -> dict[str, Any]:
    """Every phase on one stack under ``tmp``; ``engine``: an already warm tiny engine to reuse."""
    from bench import api_load, overhead, redis_cost
    from bench.stack import bench_stack
    from devtools.redis_server import RedisServer

    results: dict[str, Any] = {"plan": plan.__dict__}
    if engine is None:
        print("[bench] loading the tiny model in this process for the direct engine calls", flush=True)
        engine = overhead.load_engine()
        engine.warm_up()
    # Quick runs skip the worker's warm-up generation (start-up time); measured runs keep production's.
    extra_env = {"DARKROOM_WARMUP": "false"} if quick else {}
    with bench_stack(tmp / "stack", api_workers=plan.api_workers[0], extra_env=extra_env) as stack:
        results["stack"] = {"commands": {k: " ".join(["python", *c[1:]]) for k, c in stack.commands.items()}}
        print(f"[bench] overhead: {plan.pairs} interleaved pairs", flush=True)
        results["overhead"] = overhead.measure_overhead(
            stack, engine, pairs=plan.pairs, warmup=plan.warmup_pairs
        )
        finished = list(results["overhead"]["job_ids"])
        del engine  # free the bench process's model before the load tests

        print("[bench] Redis cost per job", flush=True)
        background = redis_cost.idle_background(stack, plan.idle_s)
        cost: dict[str, Any] = {
            "idle_per_s": background,
            "idle_monitor": redis_cost.monitor_idle(stack, plan.monitor_idle_s),
        }
        if not quick:
            cost["job"] = redis_cost.job_cost(stack, plan.redis_jobs, background)
            cost["job_monitor"] = redis_cost.monitor_one_job(stack)
        else:
            cost["job"] = redis_cost.job_cost(stack, 1, background)
        with redis_cost.WebhookReceiver() as receiver:
            if not quick:
                cost["job_with_webhook"] = redis_cost.job_cost(
                    stack, max(1, plan.redis_jobs // 2), background, receiver.url, receiver
                )
            cost["job_with_webhook_monitor"] = redis_cost.monitor_one_job(stack, receiver.url, receiver)
        cost["memory_per_job"] = redis_cost.memory_per_job(stack, finished[-1])
        sample_record = redis_cost.sample_job_record(stack, finished[-1])
        results["redis"] = cost

        stack.stop_worker()
        results["api"] = {}
        for workers in plan.api_workers:
            if workers != stack.api_workers:
                stack.restart_api(workers)
            print(f"[bench] submissions, {workers} uvicorn worker(s)", flush=True)
            submissions = api_load.measure_submissions(
                stack,
                concurrency=plan.concurrency,
                max_requests=plan.submissions,
                max_seconds=plan.submit_s,
                warmup=plan.submit_warmup,
            )
            queued = api_load.trim_queue(stack, plan.backlog)
            print(f"[bench] GETs at {plan.get_rate:g}/s, {workers} uvicorn worker(s)", flush=True)
            gets = api_load.measure_gets(
                stack,
                finished=finished,
                queued=queued,
                rate=plan.get_rate,
                duration_s=plan.get_s,
                saturation_s=plan.get_saturation_s,
                concurrency=plan.concurrency,
            )
            results["api"][str(workers)] = {"submissions": submissions, "gets": gets}

    print("[bench] microbenchmarks on a scratch Redis", flush=True)
    with RedisServer(tmp / "scratch-redis") as scratch:
        results["redis"]["recovery_pass"] = redis_cost.recovery_pass_cost(
            scratch.url, plan.recovery_running, plan.recovery_passes, sample_record
        )
        results["redis"]["lpos"] = redis_cost.lpos_cost(
            scratch.url, plan.lpos_length, list(plan.lpos_positions), calls=20 if not quick else 2
        )
    results["capacity"] = capacity(results)
    return results


def capacity(results: dict[str, Any]) -> dict[str, Any]:
    """Jobs/s one Redis (one core) and one API replica (one core) sustain, from the measured costs."""
    redis = results["redis"]
    job_cpu_ms = redis["job"]["net"]["cpu_ms"]
    out: dict[str, Any] = {
        "redis_cpu_ms_per_job": job_cpu_ms,
        "redis_jobs_per_s_at_100pct": round(1000.0 / job_cpu_ms, 1) if job_cpu_ms else None,
        "redis_jobs_per_s_at_70pct": round(700.0 / job_cpu_ms, 1) if job_cpu_ms else None,
    }
    for workers, api in results["api"].items():
        out[f"api_{workers}w_submissions_per_api_core_s"] = api["submissions"]["submissions_per_api_core_s"]
        per_get = api["gets"]["saturation"]["cpu_ms_per_get"].get("api")
        out[f"api_{workers}w_gets_per_api_core_s"] = round(1000.0 / per_get, 1) if per_get else None
    return out


def bars(results: dict[str, Any]) -> list[Bar]:
    found = [
        Bar(
            "service overhead per job, median over the direct engine call",
            results["overhead"]["difference_ms"].get("p50"),
            "<=",
            TARGET_OVERHEAD_MS,
            "ms",
            f"p95 {results['overhead']['difference_ms'].get('p95', float('nan')):.1f} ms, "
            f"ratio {results['overhead']['ratio'].get('p50', float('nan')):.3f}",
        )
    ]
    for workers, api in results["api"].items():
        submissions = api["submissions"]
        found.append(
            Bar(
                f"POST /v1/generations submissions/s, {workers} uvicorn worker(s), 2 cores shared with "
                "Redis and the load generator",
                submissions["throughput_per_s"],
                ">=",
                TARGET_SUBMISSIONS_PER_S,
                "/s",
                f"{submissions['submissions_per_api_core_s']}/s per API core",
            )
        )
        gets = api["gets"]
        found.append(
            Bar(
                f"GET /v1/generations/{{id}} p99 at {gets['rate_per_s']:g} requests/s, "
                f"{workers} uvicorn worker(s)",
                gets["latency_ms"].get("p99"),
                "<=",
                TARGET_GET_P99_MS,
                "ms",
                f"p50 {gets['latency_ms'].get('p50', float('nan')):.2f} ms",
            )
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests: figures meaningless")
    parser.add_argument("--pairs", type=int, help="interleaved overhead pairs (default 40)")
    parser.add_argument("--api-workers", help="comma-separated uvicorn worker counts (default 1,2)")
    parser.add_argument("--wait-quiet", type=float, metavar="LOAD", help="wait until the 1-min load <= LOAD")
    parser.add_argument("--wait-max", type=float, default=900.0, help="longest wait for quiet, seconds")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/service.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args(argv)

    plan = Plan.quick() if args.quick else Plan()
    if args.pairs is not None:
        plan.pairs = args.pairs
    if args.api_workers:
        plan.api_workers = tuple(int(x) for x in args.api_workers.split(","))
    quiet = wait_for_quiet(args.wait_quiet, args.wait_max) if args.wait_quiet is not None else None
    facts = machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="darkroom-bench-"))
    started = time.monotonic()
    try:
        results = run_all(plan, tmp, quick=args.quick)
    finally:
        if args.keep:
            print(f"[bench] kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    facts["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results = {
        "machine": facts,
        "quiet_wait": quiet,
        "duration_s": round(time.monotonic() - started, 1),
        **results,
    }
    results["bars"] = bars(results)
    path = write_results("service-quick" if args.quick and args.out is None else "service", results, args.out)
    print_summary(results)
    print_bars(results["bars"])
    print(f"\nresults: {path}")
    return 0


def print_summary(results: dict[str, Any]) -> None:
    o = results["overhead"]
    print("\n== service overhead (512x512, 4 steps, tiny model, CPU) ==")
    print(f"direct engine call  p50 {o['direct_ms']['p50']:.1f} ms   p95 {o['direct_ms']['p95']:.1f} ms")
    print(f"through the service p50 {o['service_ms']['p50']:.1f} ms   p95 {o['service_ms']['p95']:.1f} ms")
    print(
        f"difference          p50 {o['difference_ms']['p50']:.1f} ms   p95 {o['difference_ms']['p95']:.1f} ms"
        f"   ratio p50 {o['ratio']['p50']:.3f}"
    )
    for name, s in o["phases_ms"].items():
        print(f"  phase {name:<18} p50 {s['p50']:8.1f} ms  p95 {s['p95']:8.1f} ms")
    r = results["redis"]
    print("\n== Redis per job (background subtracted) ==")
    print(
        f"job: {r['job']['net']['commands']} commands, {r['job']['net']['bytes_in']:.0f} B in, "
        f"{r['job']['net']['bytes_out']:.0f} B out, {r['job']['net']['cpu_ms']:.3f} ms Redis CPU"
    )
    if "job_with_webhook" in r:
        w = r["job_with_webhook"]["net"]
        print(f"job + webhook: {w['commands']} commands, {w['cpu_ms']:.3f} ms Redis CPU")
    print(f"memory kept per finished job: {r['memory_per_job']['total_bytes']} B")
    rp = r["recovery_pass"]
    print(
        f"lost-job recovery pass with {rp['running']} running: {rp['commands']} commands, "
        f"{rp['cpu_ms']:.2f} ms Redis CPU, {rp['bytes_out']:.0f} B out"
    )
    for workers, api in results["api"].items():
        s, g = api["submissions"], api["gets"]
        print(f"\n== API, {workers} uvicorn worker(s) ==")
        print(
            f"submissions: {s['throughput_per_s']}/s, p50 {s['latency_ms']['p50']:.1f} ms, "
            f"p99 {s['latency_ms']['p99']:.1f} ms; cores busy {s['cores_busy']}; "
            f"CPU ms/submission {s['cpu_ms_per_submission']}"
        )
        print(
            f"GET at {g['rate_per_s']:g}/s: p50 {g['latency_ms']['p50']:.2f} ms, "
            f"p99 {g['latency_ms']['p99']:.2f} ms; saturation {g['saturation']['throughput_per_s']}/s, "
            f"CPU ms/GET {g['saturation']['cpu_ms_per_get']}"
        )
    print("\n== capacity ==")
    for key, value in results["capacity"].items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
