"""``python -m bench.fleet_sim``: a day of bursty traffic on a fleet of up to 1,000 GPU workers, simulated
second by second from measured per-job costs, under three ways of sizing the fleet.

Inputs (``--inputs bench/results/service.json``, else the defaults below, flagged as such):
- per job, measured on the CPU stack: Redis CPU and commands for one whole job (submit, worker, one read),
  Redis CPU per GET, per lost-job-recovery pass per running job, per LPOS element scanned, per idle worker;
  API CPU per submission and per GET;
- GPU seconds per image (1024x1024, 40 steps): ``--gpu-s-per-image`` (default 2.2 s, the target: *not yet
  measured* until ``bench.gpu --size full`` has run on an H100).

Model (1 s ticks, FIFO queue, one job per worker at a time):
- arrivals: Poisson, a diurnal curve (peak 15:00, night at 25 % of it), six random bursts of +30..80 % for
  10..30 minutes (seeded), and one launch at 19:00: twice the peak for 15 minutes;
- jobs: 1 image (75 %) or 4 images (25 %), service time = images x GPU s/image + measured service overhead;
- fleet sizing, one of: ``fixed`` (always ``--workers`` warm), ``keda-shipped`` (the ScaledObject we ship:
  target 1 job per replica, 15 s polling on a 15 s scrape, HPA scale-up 2 pods / 60 s, scale-down after a
  600 s window at 1 pod / 300 s; only maxReplicaCount raised to ``--workers``), ``keda-remedy`` (the same
  trigger with scale-up 100 % or 100 pods per 15 s, min replicas at 30 % of the fleet, scale-down
  10 % / 60 s);
  new pods serve after ``--start-s`` (scheduling, image pull, model load from the shared cache);
- submissions above the queue-depth ceiling (``--max-queue``, the shipped 10,000) are refused (503) and
  counted as rejected, not retried;
- clients poll every ``--poll-s`` seconds while their job is queued or running; each GET of a queued job runs
  an LPOS over the queue up to its position.

Outputs: queue wait p50/p99 (job-weighted), jobs waiting > 60 s, GPU-hours, peak queue, and the load on one
Redis (CPU cores, by source) and on the API (cores), second by second, summarised.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS_DIR, write_results

DAY_S = 24 * 3600


@dataclass
class Costs:
    """Per-unit costs; ``source`` says whether they were measured (service.json) or defaults."""

    source: str = "defaults (no service.json given)"
    redis_cpu_ms_per_job: float = 0.9
    redis_commands_per_job: float = 76.0
    redis_cpu_ms_per_get: float = 0.06
    redis_cpu_us_per_running_job_per_recovery_pass: float = 25.0
    redis_bytes_out_per_running_job_per_recovery_pass: float = 1300.0
    redis_usec_per_lpos_element: float = 0.005
    redis_cpu_ms_per_idle_worker_s: float = 0.01
    api_cpu_ms_per_submission: float = 4.3
    api_cpu_ms_per_get: float = 1.4
    service_overhead_s: float = 0.04
    memory_bytes_per_job: float = 13500.0
    memory_byte_days_per_job: float = 53000.0  # each key's bytes x the days it lives (records 7 d, RQ 1 d)

    @classmethod
    def from_service(cls, path: Path) -> Costs:
        data = json.loads(path.read_text())
        redis, api = data["redis"], data["api"]
        one = api.get("1") or next(iter(api.values()))
        # An idle GPU worker's own commands (MONITOR), costed at the measured Redis CPU per job command;
        # Redis's own idle cron (hz, AOF fsync) is per server, not per worker, and is left out.
        idle_commands = sum(redis["idle_monitor"]["per_second_by_process"].get("worker", {}).values())
        per_command_ms = redis["job"]["net"]["cpu_ms"] / max(redis["job"]["net"]["commands"], 1)
        return cls(
            source=f"measured: {path}",
            redis_cpu_ms_per_job=redis["job"]["net"]["cpu_ms"],
            redis_commands_per_job=redis["job"]["net"]["commands"],
            redis_cpu_ms_per_get=one["gets"]["redis_per_get"]["cpu_ms"],
            redis_cpu_us_per_running_job_per_recovery_pass=redis["recovery_pass"][
                "redis_cpu_us_per_running_job"
            ],
            redis_bytes_out_per_running_job_per_recovery_pass=redis["recovery_pass"][
                "bytes_out_per_running_job"
            ],
            redis_usec_per_lpos_element=redis["lpos"]["usec_per_element_scanned"] or 0.005,
            redis_cpu_ms_per_idle_worker_s=idle_commands * per_command_ms,
            api_cpu_ms_per_submission=one["submissions"]["cpu_ms_per_submission"]["api"],
            api_cpu_ms_per_get=one["gets"]["saturation"]["cpu_ms_per_get"]["api"],
            service_overhead_s=max(0.0, data["overhead"]["phases_ms"]["outside_engine_s"]["p50"] / 1000.0),
            memory_bytes_per_job=redis["memory_per_job"]["total_bytes"],
            memory_byte_days_per_job=sum(
                size * max(redis["memory_per_job"]["ttl_s"][key], 0) / 86400
                for key, size in redis["memory_per_job"]["keys"].items()
            ),
        )


@dataclass
class Scenario:
    workers: int = 1000
    gpu_s_per_image: float = 2.2
    gpu_s_source: str = "target (not yet measured)"
    start_s: float = 180.0
    poll_s: float = 2.0
    heartbeat_s: float = 5.0
    peak_jobs_per_s: float = 230.0  # diurnal peak before bursts; the fleet serves ~260 jobs/s at 2.2 s/image
    night_fraction: float = 0.25
    bursts: int = 6
    seed: int = 11
    image_mix: tuple[tuple[int, float], ...] = ((1, 0.75), (4, 0.25))
    max_queue: int = 10_000  # DARKROOM_MAX_QUEUE_DEPTH: above it submissions get 503 (counted as rejected)


@dataclass
class Autoscaler:
    name: str
    min_replicas: int
    max_replicas: int
    polling_s: int = 15
    scrape_s: int = 15
    up_pods: int = 2
    up_percent: float = 0.0
    up_period_s: int = 60
    down_window_s: int = 600
    down_pods: int = 1
    down_percent: float = 0.0
    down_period_s: int = 300
    fixed: bool = False


def autoscalers(workers: int) -> dict[str, Autoscaler]:
    return {
        "fixed": Autoscaler("fixed", workers, workers, fixed=True),
        "keda-shipped": Autoscaler("keda-shipped", 1, workers),
        "keda-remedy": Autoscaler(
            "keda-remedy",
            int(workers * 0.3),
            workers,
            up_pods=100,
            up_percent=1.0,
            up_period_s=15,
            down_pods=0,
            down_percent=0.10,
            down_period_s=60,
        ),
    }


def arrival_rates(s: Scenario, rng: np.random.Generator) -> np.ndarray:
    """Jobs/s for each second of the day: diurnal curve (peak 15:00 UTC), bursts, one launch spike."""
    t = np.arange(DAY_S)
    phase = np.cos(2 * np.pi * (t / DAY_S - 15 / 24))  # 1 at 15:00, -1 at 03:00
    base = s.peak_jobs_per_s * (s.night_fraction + (1 - s.night_fraction) * (phase + 1) / 2)
    rate = base.copy()
    for _ in range(s.bursts):
        start = int(rng.uniform(6, 22) * 3600)
        length = int(rng.uniform(10, 30) * 60)
        rate[start : start + length] += base[start : start + length] * rng.uniform(0.3, 0.8)
    launch = 19 * 3600
    rate[launch : launch + 15 * 60] += s.peak_jobs_per_s  # a launch: twice the peak for 15 minutes
    return rate


def simulate(s: Scenario, a: Autoscaler, c: Costs) -> dict[str, Any]:
    rng = np.random.default_rng(s.seed)
    rates = arrival_rates(s, rng)
    arrivals = rng.poisson(rates)
    images, weights = zip(*s.image_mix, strict=True)
    horizon = DAY_S + 4 * 3600  # let the backlog drain after midnight
    completions = np.zeros(horizon + 4000, dtype=np.int64)
    starts = np.zeros(horizon, dtype=np.int64)
    queue_len = np.zeros(horizon, dtype=np.int64)
    admitted = np.zeros(DAY_S, dtype=np.int64)
    replicas_series = np.zeros(horizon, dtype=np.int64)
    busy_series = np.zeros(horizon, dtype=np.int64)
    ready = a.min_replicas if not a.fixed else a.max_replicas
    desired_series: list[tuple[int, int]] = []
    pending_ready: list[tuple[int, int]] = []  # (tick it becomes ready, pods)
    target = ready
    queue = 0
    busy = 0
    gpu_busy_s = 0.0
    replica_seconds = 0
    metric_history: list[tuple[int, int]] = [(0, 0)]
    last_up = -(10**9)
    last_down = -(10**9)
    for tick in range(horizon):
        busy -= int(completions[tick])
        new = int(arrivals[tick]) if tick < DAY_S else 0
        if new:
            new = min(new, max(0, s.max_queue - queue))
            admitted[tick] = new
        queue += new
        while pending_ready and pending_ready[0][0] <= tick:
            ready += pending_ready.pop(0)[1]
        # Scale-down only removes idle capacity here (warm shutdown: a busy pod finishes its job first).
        free = max(0, ready - busy)
        start = min(queue, free)
        if start:
            sizes = rng.choice(images, size=start, p=weights)
            durations = np.ceil(sizes * s.gpu_s_per_image + c.service_overhead_s).astype(np.int64)
            np.add.at(completions, tick + durations, 1)
            gpu_busy_s += float(durations.sum())
        queue -= start
        busy += start
        starts[tick] = start
        queue_len[tick] = queue
        busy_series[tick] = busy
        replicas_series[tick] = ready + sum(p for _, p in pending_ready)
        replica_seconds += ready
        if tick % a.scrape_s == 0:
            metric_history.append((tick, queue + busy))
        if not a.fixed and tick % a.polling_s == 0:
            observed = metric_history[-1][1]  # the last scrape, up to scrape_s old
            desired = min(a.max_replicas, max(a.min_replicas, math.ceil(observed / 1.0)))
            desired_series.append((tick, desired))
            current = target
            if desired > current and tick - last_up >= 0:
                allowed = max(a.up_pods, int(current * a.up_percent)) if a.up_percent else a.up_pods
                # HPA policies limit the change within each period: spread over the period windows.
                step = min(desired - current, allowed)
                if tick - last_up >= a.up_period_s or a.up_period_s <= a.polling_s:
                    target = current + step
                    pending_ready.append((tick + int(s.start_s), step))
                    pending_ready.sort()
                    last_up = tick
            elif desired < current:
                window = [d for t0, d in desired_series if tick - t0 <= a.down_window_s]
                recommended = max(window) if window else desired
                if recommended < current and tick - last_down >= a.down_period_s:
                    allowed = max(a.down_pods, int(current * a.down_percent))
                    step = min(current - recommended, allowed)
                    removable = min(step, max(0, ready - busy))  # idle pods go first
                    if removable:
                        target = current - removable
                        ready -= removable
                        last_down = tick
    waits = fifo_waits(admitted, starts)
    completed = int(starts.sum())
    return summarize(
        s,
        a,
        c,
        rates,
        arrivals,
        admitted,
        waits,
        queue_len,
        busy_series,
        replicas_series,
        gpu_busy_s,
        replica_seconds,
        completed,
    )


def fifo_waits(arrivals: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per-job queue wait (seconds) for a FIFO queue, from per-tick arrival and start counts."""
    arrival_ticks = np.repeat(np.arange(len(arrivals), dtype=np.int64), arrivals.astype(np.int64))
    start_ticks = np.repeat(np.arange(len(starts), dtype=np.int64), starts.astype(np.int64))
    n = min(len(arrival_ticks), len(start_ticks))
    return (start_ticks[:n] - arrival_ticks[:n]).astype(np.float64)


def summarize(
    s: Scenario,
    a: Autoscaler,
    c: Costs,
    rates: np.ndarray,
    arrivals: np.ndarray,
    admitted: np.ndarray,
    waits: np.ndarray,
    queue_len: np.ndarray,
    busy: np.ndarray,
    replicas: np.ndarray,
    gpu_busy_s: float,
    replica_seconds: int,
    completed: int,
) -> dict[str, Any]:
    horizon = len(queue_len)
    in_flight = queue_len + busy
    jobs_per_s = np.zeros(horizon)
    jobs_per_s[:DAY_S] = admitted
    gets_per_s = in_flight / s.poll_s
    # Redis CPU (cores), by source, each second.
    per_job = jobs_per_s * c.redis_cpu_ms_per_job / 1000.0
    polling = gets_per_s * c.redis_cpu_ms_per_get / 1000.0
    queued_share = np.divide(queue_len, np.maximum(in_flight, 1))
    # A GET of a queued job scans to its position: on average half the queue.
    lpos = gets_per_s * queued_share * (queue_len / 2.0) * c.redis_usec_per_lpos_element / 1e6
    recovery = (replicas / s.heartbeat_s) * busy * c.redis_cpu_us_per_running_job_per_recovery_pass / 1e6
    idle = replicas * c.redis_cpu_ms_per_idle_worker_s / 1000.0
    total = per_job + polling + lpos + recovery + idle
    recovery_bytes = (replicas / s.heartbeat_s) * busy * c.redis_bytes_out_per_running_job_per_recovery_pass
    api_cores = (jobs_per_s * c.api_cpu_ms_per_submission + gets_per_s * c.api_cpu_ms_per_get) / 1000.0

    def peak_and_p50(x: np.ndarray) -> dict[str, float]:
        return {"p50": round(float(np.percentile(x[:DAY_S], 50)), 3), "peak": round(float(x.max()), 3)}

    return {
        "autoscaler": asdict(a),
        "jobs": int(arrivals.sum()),
        "admitted": int(admitted.sum()),
        "rejected_queue_full_share": round(1 - float(admitted.sum()) / max(float(arrivals.sum()), 1.0), 4),
        "completed": completed,
        "arrival_peak_per_s": round(float(rates.max()), 1),
        "queue_wait_s": {
            "p50": round(float(np.percentile(waits, 50)), 1) if len(waits) else None,
            "p99": round(float(np.percentile(waits, 99)), 1) if len(waits) else None,
            "max": round(float(waits.max()), 1) if len(waits) else None,
            "share_over_60s": round(float((waits > 60).mean()), 4) if len(waits) else None,
        },
        "queue_peak": int(queue_len.max()),
        "replicas": {
            "min": int(replicas[:DAY_S].min()),
            "max": int(replicas.max()),
            "gpu_hours_provisioned": round(replica_seconds / 3600, 1),
        },
        "gpu_utilization": round(gpu_busy_s / max(replica_seconds, 1), 3),
        "redis_cores": {
            "total": peak_and_p50(total),
            "per_job_work": peak_and_p50(per_job),
            "client_polling": peak_and_p50(polling),
            "lpos_queue_position": peak_and_p50(lpos),
            "lost_job_recovery_scans": peak_and_p50(recovery),
            "idle_workers": peak_and_p50(idle),
        },
        "redis_recovery_scan_mb_out_per_s_peak": round(float(recovery_bytes.max()) / 1e6, 1),
        "redis_commands_per_s_job_work_peak": round(float((jobs_per_s * c.redis_commands_per_job).max())),
        "api_cores": peak_and_p50(api_cores),
        "redis_memory_gib_steady_state": round(
            float(admitted.sum()) * c.memory_byte_days_per_job / 1024**3, 1
        ),
        "webhooks_per_s_peak": round(float(rates.max()), 1),
    }


def print_table(results: dict[str, Any]) -> None:
    print(f"costs: {results['costs']['source']}")
    print(
        f"fleet capacity {results['fleet_capacity_jobs_per_s']} jobs/s; diurnal peak "
        f"{results['scenario']['peak_jobs_per_s']} jobs/s; "
        f"GPU s/image {results['scenario']['gpu_s_per_image']} ({results['scenario']['gpu_s_source']})"
    )
    header = (
        f"{'fleet':<13} {'wait p50':>9} {'wait p99':>9} {'>60s':>6} {'queue pk':>9} {'repl min/max':>13} "
        f"{'GPU-h':>8} {'util':>5} {'Redis cores p50/peak':>21} {'API cores p50/peak':>19} {'503s':>6}"
    )
    print(header)
    for name, r in results["runs"].items():
        w, rc, ac = r["queue_wait_s"], r["redis_cores"]["total"], r["api_cores"]
        print(
            f"{name:<13} {w['p50']:>8.0f}s {w['p99']:>8.0f}s {w['share_over_60s']:>6.1%} "
            f"{r['queue_peak']:>9} {r['replicas']['min']:>6}/{r['replicas']['max']:<6} "
            f"{r['replicas']['gpu_hours_provisioned']:>8.0f} {r['gpu_utilization']:>5.2f} "
            f"{rc['p50']:>9.2f}/{rc['peak']:<11.2f} {ac['p50']:>8.2f}/{ac['peak']:<10.2f} "
            f"{r['rejected_queue_full_share']:>6.1%}"
        )
    for name, r in results["runs"].items():
        parts = ", ".join(
            f"{k} {v['p50']:.2f}/{v['peak']:.2f}" for k, v in r["redis_cores"].items() if k != "total"
        )
        print(f"  {name} Redis cores by source (p50/peak): {parts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_sim", description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=Path, default=RESULTS_DIR / "service.json")
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--gpu-s-per-image", type=float, default=2.2)
    parser.add_argument("--gpu-s-source", default="target (not yet measured)")
    parser.add_argument("--start-s", type=float, default=180.0)
    parser.add_argument("--poll-s", type=float, default=2.0)
    parser.add_argument("--peak", type=float, help="diurnal peak jobs/s (default: 80%% of fleet capacity)")
    parser.add_argument("--max-queue", type=int, default=10_000, help="queue-depth ceiling (503 above)")
    parser.add_argument("--scenarios", default="fixed,keda-shipped,keda-remedy")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    costs = Costs.from_service(args.inputs) if args.inputs and args.inputs.exists() else Costs()
    scenario = Scenario(
        workers=args.workers,
        gpu_s_per_image=args.gpu_s_per_image,
        gpu_s_source=args.gpu_s_source,
        start_s=args.start_s,
        poll_s=args.poll_s,
        max_queue=args.max_queue,
    )
    mean_images = sum(n * p for n, p in scenario.image_mix)
    capacity = args.workers / (mean_images * args.gpu_s_per_image + costs.service_overhead_s)
    scenario.peak_jobs_per_s = args.peak or round(0.80 * capacity, 1)
    results: dict[str, Any] = {
        "costs": asdict(costs),
        "scenario": asdict(scenario),
        "fleet_capacity_jobs_per_s": round(capacity, 1),
        "runs": {},
    }
    fleets = autoscalers(args.workers)
    for name in args.scenarios.split(","):
        print(f"[sim] {name}", flush=True)
        results["runs"][name] = simulate(scenario, fleets[name], costs)
    path = write_results(f"fleet-sim-{args.workers}", results, args.out)
    print_table(results)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
