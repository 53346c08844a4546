"""``python -m bench.fleet_sim``: a day of bursty traffic on a fleet of up to 1,000 GPU workers, simulated
second by second from measured per-job costs, under three ways of sizing the fleet and two designs of the
control plane (``--design shipped,fleet``: one command gives the before and the after).

Inputs, each cost recorded in the output with where it came from (``costs.provenance``); a cost no file
gave is printed as "assumed, not measured", never silently:
- ``--inputs bench/results/service.json`` (the shipped design's costs, measured on the CPU stack): Redis CPU
  and commands for one whole job (submit, worker, one read), with and without a webhook delivery, Redis CPU
  per GET, per lost-job-recovery pass per running job, per LPOS element scanned, per idle worker; memory per
  job and its keys' TTLs; API CPU per submission and per GET;
- every ``bench/results/*.json`` with a top-level ``"fleet_sim_inputs"`` object, in name order, then each
  ``--costs FILE`` given: ``{"<Costs field>": number, ...}`` overrides that cost (an unknown field is an
  error). ``bench.redis_primitives`` writes one (``redis-primitives.json``: the new design's Redis
  primitives on a real redis-server); the streams that build the new design add theirs the same way;
- GPU seconds per image (1024x1024, 40 steps): ``--gpu-s-per-image`` (default 2.2 s, the target: *not yet
  measured* until ``bench.gpu --size full`` has run on an H100).

Model (1 s ticks, FIFO queue, one job per worker at a time):
- arrivals: Poisson, a diurnal curve (peak 15:00, night at 25 % of it), six random bursts of +30..80 % for
  10..30 minutes (seeded), and one launch at 19:00: twice the peak for 15 minutes;
- jobs: 1 image (75 %) or 4 images (25 %), service time = images x GPU s/image + measured service overhead;
- fleet sizing, one of: ``fixed`` (always ``--workers`` warm), ``keda-shipped`` (the worker ScaledObject as
  shipped before issue #17: target 1 job per replica, 15 s polling on a 15 s scrape, HPA scale-up 2 pods /
  60 s, scale-down after a 600 s window at 1 pod / 300 s; only maxReplicaCount raised to ``--workers``),
  ``keda-remedy`` (what deploy/k8s/overlays/production ships now, a test holds the two together: the same
  trigger with scale-up 100 % or 100 pods per 15 s, min replicas at 30 % of the fleet, scale-down 10 % /
  60 s); the HPA's rounding (a Percent step up rounds up, down rounds down) and its 10 % tolerance (no
  change while wanted / current is within 0.9..1.1) apply; new pods serve after ``--start-s``
  (scheduling, image pull, model load from the shared cache);
- submissions above the queue-depth ceiling (``--max-queue``, the shipped 10,000) are refused (503) and
  counted as rejected, not retried;
- every job ends with one webhook delivery (``Scenario.webhook_share``, the worst case), and a small share
  of jobs is lost by its worker (``Scenario.lost_share``: node or pod lost) and requeued by recovery.

The queue, waits and fleet size do not depend on the design; what each second costs Redis and the API does.

``shipped`` (the design at 45398c6):
- lost-job recovery: every worker, every heartbeat (5 s), reads every running job of the fleet:
  replicas / 5 x running x (Redis CPU per running job per pass) — O(workers x running);
- clients poll every ``--poll-s`` while their job is queued or running; each GET of a queued job runs an
  LPOS over the queue up to its position (on average half the queue);
- memory: every admitted job's keys for their TTL (job record + events 7 d, RQ job + result 1 d), i.e. a
  day's jobs x the byte-days per job;
- webhooks: each delivery is an RQ job plus its delivery record, ~70 commands (measured per delivery as
  the job-with-webhook cost minus the job's).

``fleet`` (issue #17, built by the other streams; costs from their results files when given):
- recovery (a): one pass per fleet per heartbeat interval, made by the holder of a lease (``SET NX PX``);
  every worker tries the lease each interval (a non-holder's try is one cheap call); the pass reads only the
  jobs whose last beat is older than ``lost_after`` from a ZSET (``ZRANGEBYSCORE ... LIMIT``): cost =
  replicas / 5 x (lease try) + 1 / 5 x (pass) + lost jobs/s x (per lost job) + running / 5 x (the extra
  ZADD each heartbeat makes) — constant per pass, plus O(lost);
- queue position (b): from counters, two GETs per read of a queued job, O(1); queued reads carry a
  Retry-After of the expected wait (position / the fleet's drain rate, capped at
  ``Scenario.retry_after_cap_s``) and clients honour it: a job at position p polls every
  max(``--poll-s``, p / drain rate) s, so the queued GETs/s are the closed-form sum of those rates over
  positions 1..queue; running jobs poll every ``--poll-s``;
- memory (c): finished jobs archived to object storage and trimmed from Redis after a short TTL, RQ keeps
  no result: memory each second = (queued + running) x bytes per live job + jobs finished within the TTL x
  bytes per finished job; "steady state" is the peak of that over the day;
- webhooks (d): a concurrent dispatcher; per delivery a few Redis commands (its Redis CPU an input);
- per-job work, per GET (of the job record), idle workers and API costs: as measured for ``shipped`` unless
  a results file gives the fleet design's own: a job at the peak (``bench.job_replay``) as its fixed part
  plus its progress writes (``Scenario.progress_writes_per_job``), else a job measured alone
  (``redis_cpu_ms_per_job_fleet``).

Outputs: queue wait p50/p99 (job-weighted), jobs waiting > 60 s, GPU-hours, peak queue, and the load on one
Redis (CPU cores, by source) and on the API (cores), second by second, summarised; and, per design, the three
figures issue #17 sets targets for, at ``--workers`` on this day: **Redis cores at the peak second (target
<= 1), recovery cores (target <= 0.05), Redis memory at steady state (target <= 8 GiB)**, each with the
assumed (not measured) costs it rests on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS_DIR, ROOT, write_results

DAY_S = 24 * 3600
DESIGNS = ("shipped", "fleet")
ASSUMED = "assumed, not measured"
#: The results-file key whose object overrides ``Costs`` fields (see the module docstring).
INPUTS_KEY = "fleet_sim_inputs"
#: Issue #17's targets for a 1,000-worker fleet on one Redis.
TARGETS = {"redis_cores_peak": 1.0, "recovery_cores_peak": 0.05, "redis_memory_gib_steady_state": 8.0}


def _shown(path: Path) -> str:
    """A results file as the report names it: relative to the repository when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


@dataclass
class Costs:
    """Per-unit costs. ``provenance`` names, for each field a file gave, that file; every other field is a
    default, reported as assumed, not measured."""

    source: str = "defaults (no service.json given)"
    # --- the shipped design (service.json) ---
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
    redis_cpu_ms_per_delivery_shipped: float = 1.0  # RQ webhook job + delivery record, ~70 commands
    # --- the fleet design (issue #17): results files of the streams that build it ---
    redis_cpu_ms_per_job_fleet: float | None = None  # None: the shipped per-job cost
    # A job's cost at the fleet's peak, split (bench.job_replay): everything but its progress writes, and
    # each progress write (an SD3.5 job makes one a second: counted from the scenario). Given, these
    # replace ``redis_cpu_ms_per_job_fleet`` (a job measured alone on an idle Redis).
    redis_cpu_ms_per_job_fixed_at_peak_fleet: float | None = None
    redis_cpu_ms_per_progress_write_at_peak_fleet: float = 0.0
    redis_us_per_lease_try: float = 15.0  # a worker that does not hold the recovery lease asks once
    redis_us_per_recovery_pass: float = 60.0  # the holder's pass with nothing stale: lease + ZRANGEBYSCORE
    redis_us_per_lost_job: float = 300.0  # reading and requeueing one lost job (a lifecycle transition)
    redis_us_per_heartbeat_zadd: float = 10.0  # the extra ZADD per running job per heartbeat
    redis_us_per_position_read: float = 15.0  # queue position from two counters (two GETs)
    memory_bytes_per_live_job: float = 8800.0  # queued or running: job hash + events + RQ job
    memory_bytes_per_finished_job: float = 7000.0  # finished, until trimmed: job hash + events
    finished_ttl_s: float = 600.0  # how long a finished job stays in Redis before the trim
    redis_cpu_ms_per_delivery_fleet: float = 0.1  # a few commands per delivery by the dispatcher
    provenance: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_service(cls, path: Path) -> Costs:
        data = json.loads(path.read_text())
        redis, api = data["redis"], data["api"]
        one = api.get("1") or next(iter(api.values()))
        # An idle GPU worker's own commands (MONITOR), costed at the measured Redis CPU per job command;
        # Redis's own idle cron (hz, AOF fsync) is per server, not per worker, and is left out.
        idle_commands = sum(redis["idle_monitor"]["per_second_by_process"].get("worker", {}).values())
        per_command_ms = redis["job"]["net"]["cpu_ms"] / max(redis["job"]["net"]["commands"], 1)
        values: dict[str, float] = {
            "redis_cpu_ms_per_job": redis["job"]["net"]["cpu_ms"],
            "redis_commands_per_job": redis["job"]["net"]["commands"],
            "redis_cpu_ms_per_get": one["gets"]["redis_per_get"]["cpu_ms"],
            "redis_cpu_us_per_running_job_per_recovery_pass": redis["recovery_pass"][
                "redis_cpu_us_per_running_job"
            ],
            "redis_bytes_out_per_running_job_per_recovery_pass": redis["recovery_pass"][
                "bytes_out_per_running_job"
            ],
            "redis_usec_per_lpos_element": redis["lpos"]["usec_per_element_scanned"] or 0.005,
            "redis_cpu_ms_per_idle_worker_s": idle_commands * per_command_ms,
            "api_cpu_ms_per_submission": one["submissions"]["cpu_ms_per_submission"]["api"],
            "api_cpu_ms_per_get": one["gets"]["saturation"]["cpu_ms_per_get"]["api"],
            "service_overhead_s": max(0.0, data["overhead"]["phases_ms"]["outside_engine_s"]["p50"] / 1000.0),
            "memory_bytes_per_job": redis["memory_per_job"]["total_bytes"],
            "memory_byte_days_per_job": sum(
                size * max(redis["memory_per_job"]["ttl_s"][key], 0) / 86400
                for key, size in redis["memory_per_job"]["keys"].items()
            ),
        }
        # The fleet design keeps the same keys while a job is live (minus RQ's result, which it drops) and
        # the job hash + events until the trim: today's sizes of those keys, until the archive stream
        # measures its own (a trimmed record can only be smaller).
        sizes = redis["memory_per_job"]["keys"]
        record = sum(size for key, size in sizes.items() if key.startswith("darkroom:job:"))
        rq_job = sum(size for key, size in sizes.items() if key.startswith("rq:job:"))
        if record:
            values["memory_bytes_per_live_job"] = record + rq_job
            values["memory_bytes_per_finished_job"] = record
        if "job_with_webhook" in redis:
            values["redis_cpu_ms_per_delivery_shipped"] = max(
                0.0, redis["job_with_webhook"]["net"]["cpu_ms"] - redis["job"]["net"]["cpu_ms"]
            )
        costs = cls(source=f"measured: {_shown(path)}")
        costs.apply(values, f"measured: {_shown(path)}")
        return costs

    def apply(self, values: dict[str, Any], provenance: str) -> None:
        """Set the named costs from a measurement; an unknown name is a mistake in the file, not a no-op."""
        known = {f.name for f in fields(self)} - {"source", "provenance"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{provenance}: unknown {INPUTS_KEY} fields {unknown}; known: {sorted(known)}")
        for name, value in values.items():
            setattr(self, name, float(value))
            self.provenance[name] = provenance

    def apply_file(self, path: Path) -> bool:
        """Apply ``path``'s ``fleet_sim_inputs`` if it has any; returns whether it had."""
        data = json.loads(path.read_text())
        inputs = data.get(INPUTS_KEY) if isinstance(data, dict) else None
        if not inputs:
            return False
        self.apply(inputs, f"measured: {_shown(path)}")
        return True

    def origin(self, name: str) -> str:
        return self.provenance.get(name, ASSUMED)

    def per_job_fleet_ms(self, progress_writes_per_job: float) -> float:
        """A job's Redis CPU under the fleet design: at the peak, split by progress writes, when measured
        so; else as measured alone; else the shipped design's."""
        if self.redis_cpu_ms_per_job_fixed_at_peak_fleet is not None:
            return (
                self.redis_cpu_ms_per_job_fixed_at_peak_fleet
                + progress_writes_per_job * self.redis_cpu_ms_per_progress_write_at_peak_fleet
            )
        return (
            self.redis_cpu_ms_per_job
            if self.redis_cpu_ms_per_job_fleet is None
            else self.redis_cpu_ms_per_job_fleet
        )


#: The costs each design's three target figures rest on (besides the traffic), for the "assumed" flags.
TARGET_INPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "shipped": {
        "redis_cores_peak": (
            "redis_cpu_ms_per_job",
            "redis_cpu_ms_per_get",
            "redis_usec_per_lpos_element",
            "redis_cpu_us_per_running_job_per_recovery_pass",
            "redis_cpu_ms_per_idle_worker_s",
            "redis_us_per_lost_job",
            "redis_cpu_ms_per_delivery_shipped",
        ),
        "recovery_cores_peak": ("redis_cpu_us_per_running_job_per_recovery_pass", "redis_us_per_lost_job"),
        "redis_memory_gib_steady_state": ("memory_byte_days_per_job",),
    },
    "fleet": {
        "redis_cores_peak": (
            "redis_cpu_ms_per_job_fleet",
            "redis_cpu_ms_per_get",
            "redis_us_per_position_read",
            "redis_us_per_lease_try",
            "redis_us_per_recovery_pass",
            "redis_us_per_lost_job",
            "redis_us_per_heartbeat_zadd",
            "redis_cpu_ms_per_idle_worker_s",
            "redis_cpu_ms_per_delivery_fleet",
        ),
        "recovery_cores_peak": (
            "redis_us_per_lease_try",
            "redis_us_per_recovery_pass",
            "redis_us_per_lost_job",
            "redis_us_per_heartbeat_zadd",
        ),
        "redis_memory_gib_steady_state": (
            "memory_bytes_per_live_job",
            "memory_bytes_per_finished_job",
            "finished_ttl_s",
        ),
    },
}


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
    webhook_share: float = 1.0  # jobs with a webhook: all of them, the worst case
    lost_share: float = 0.001  # jobs whose worker is lost mid-job (assumed): recovery requeues them
    retry_after_cap_s: float = 60.0  # the fleet design's Retry-After on queued jobs is at most this
    progress_interval_s: float = 1.0  # DARKROOM_PROGRESS_INTERVAL's default: least time between writes

    def progress_writes_per_job(self) -> float:
        """Progress writes of the mean job (worker.runner.ProgressReporter): the first step, one each
        ``progress_interval_s`` of the run after it, and the last step."""
        return sum(
            share * (math.floor(images * self.gpu_s_per_image / self.progress_interval_s) + 2)
            for images, share in self.image_mix
        )


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
    tolerance: float = 0.1  # the HPA's: no change while wanted / current is within 1 +- this
    fixed: bool = False

    def up_step(self, current: int) -> int:
        """Most pods one scale-up may add (HPA: Max of the policies; a Percent step rounds up)."""
        by_percent = math.ceil(current * (1 + self.up_percent)) - current if self.up_percent else 0
        return max(self.up_pods, by_percent)

    def down_step(self, current: int) -> int:
        """Most pods one scale-down may remove (HPA: a Percent limit rounds the remaining pods down)."""
        by_percent = current - int(current * (1 - self.down_percent)) if self.down_percent else 0
        return max(self.down_pods, by_percent)


def autoscalers(workers: int) -> dict[str, Autoscaler]:
    """The three ways of sizing the fleet. ``keda-remedy`` is what deploy/k8s/overlays/production ships
    (tests/deploy checks the two field for field); ``keda-shipped`` is the base ScaledObject before it."""
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


@dataclass
class Day:
    """One simulated day's per-second series: what every design's costs are computed from."""

    scenario: Scenario
    autoscaler: Autoscaler
    rates: np.ndarray
    arrivals: np.ndarray
    admitted: np.ndarray
    waits: np.ndarray
    queue_len: np.ndarray
    busy: np.ndarray
    replicas: np.ndarray
    finished: np.ndarray  # jobs that finished in each second
    gpu_busy_s: float
    replica_seconds: int
    completed: int
    mean_service_s: float


def run_day(s: Scenario, a: Autoscaler, c: Costs) -> Day:
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
            current = target
            wanted = math.ceil(observed / 1.0)
            if current and abs(wanted / current - 1) <= a.tolerance:
                wanted = current  # within the HPA's tolerance: no change
            desired = min(a.max_replicas, max(a.min_replicas, wanted))
            desired_series.append((tick, desired))
            if desired > current and tick - last_up >= 0:
                # HPA policies limit the change within each period: spread over the period windows.
                step = min(desired - current, a.up_step(current))
                if tick - last_up >= a.up_period_s or a.up_period_s <= a.polling_s:
                    target = current + step
                    pending_ready.append((tick + int(s.start_s), step))
                    pending_ready.sort()
                    last_up = tick
            elif desired < current:
                window = [d for t0, d in desired_series if tick - t0 <= a.down_window_s]
                recommended = max(window) if window else desired
                if recommended < current and tick - last_down >= a.down_period_s:
                    step = min(current - recommended, a.down_step(current))
                    removable = min(step, max(0, ready - busy))  # idle pods go first
                    if removable:
                        target = current - removable
                        ready -= removable
                        last_down = tick
    mean_images = sum(n * p for n, p in s.image_mix)
    return Day(
        scenario=s,
        autoscaler=a,
        rates=rates,
        arrivals=arrivals,
        admitted=admitted,
        waits=fifo_waits(admitted, starts),
        queue_len=queue_len,
        busy=busy_series,
        replicas=replicas_series,
        finished=completions[:horizon].copy(),
        gpu_busy_s=gpu_busy_s,
        replica_seconds=replica_seconds,
        completed=int(starts.sum()),
        mean_service_s=mean_images * s.gpu_s_per_image + c.service_overhead_s,
    )


def simulate(s: Scenario, a: Autoscaler, c: Costs, design: str = "shipped") -> dict[str, Any]:
    """One day under autoscaler ``a``, its costs as ``design`` (shipped or fleet) would incur them."""
    return summarize(run_day(s, a, c), c, design)


def fifo_waits(arrivals: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per-job queue wait (seconds) for a FIFO queue, from per-tick arrival and start counts."""
    arrival_ticks = np.repeat(np.arange(len(arrivals), dtype=np.int64), arrivals.astype(np.int64))
    start_ticks = np.repeat(np.arange(len(starts), dtype=np.int64), starts.astype(np.int64))
    n = min(len(arrival_ticks), len(start_ticks))
    return (start_ticks[:n] - arrival_ticks[:n]).astype(np.float64)


def queued_gets_per_s(queued: np.ndarray, drain_per_s: np.ndarray, poll_s: float, cap_s: float) -> np.ndarray:
    """GETs/s from ``queued`` clients that each poll every max(poll_s, min(cap_s, position / drain)) s.

    Positions 1..Q; below ``poll_s x drain`` clients poll at 1/poll_s; from there to ``cap_s x drain`` at
    drain / p (summed as drain x ln of the range's ends); beyond, at 1/cap_s.
    """
    q = queued.astype(np.float64)
    r = np.maximum(drain_per_s, 1e-9)
    fast_end = np.minimum(q, poll_s * r)
    hinted_end = np.minimum(q, cap_s * r)
    fast = fast_end / poll_s
    hinted = r * np.log(np.maximum(hinted_end, 1.0) / np.maximum(fast_end, 1.0))
    hinted = np.where(hinted_end > fast_end, hinted, 0.0)
    capped = np.maximum(0.0, q - hinted_end) / cap_s
    return fast + hinted + capped


def redis_load(day: Day, c: Costs, design: str) -> dict[str, np.ndarray]:
    """Redis CPU (cores) each second, by source, for ``design``; plus the series the summary reports."""
    s = day.scenario
    horizon = len(day.queue_len)
    queue_len, busy, replicas = day.queue_len, day.busy, day.replicas
    jobs_per_s = np.zeros(horizon)
    jobs_per_s[:DAY_S] = day.admitted
    deliveries = day.finished * s.webhook_share
    lost_per_s = day.finished * s.lost_share
    running_gets = busy / s.poll_s
    if design == "shipped":
        queued_gets = queue_len / s.poll_s
        per_job = jobs_per_s * c.redis_cpu_ms_per_job / 1000.0
        # A GET of a queued job scans to its position: on average half the queue.
        position = queued_gets * (queue_len / 2.0) * c.redis_usec_per_lpos_element / 1e6
        scans = (replicas / s.heartbeat_s) * busy * c.redis_cpu_us_per_running_job_per_recovery_pass / 1e6
        recovery = scans + lost_per_s * c.redis_us_per_lost_job / 1e6
        webhooks = deliveries * c.redis_cpu_ms_per_delivery_shipped / 1000.0
        memory = np.full(horizon, float(day.admitted.sum()) * c.memory_byte_days_per_job)
    elif design == "fleet":
        drain = np.maximum(busy, 1) / day.mean_service_s  # jobs/s leaving the queue when it is not empty
        queued_gets = queued_gets_per_s(queue_len, drain, s.poll_s, s.retry_after_cap_s)
        per_job = jobs_per_s * c.per_job_fleet_ms(s.progress_writes_per_job()) / 1000.0
        position = queued_gets * c.redis_us_per_position_read / 1e6
        recovery = (
            (replicas / s.heartbeat_s) * c.redis_us_per_lease_try
            + (1.0 / s.heartbeat_s) * c.redis_us_per_recovery_pass
            + lost_per_s * c.redis_us_per_lost_job
            + (busy / s.heartbeat_s) * c.redis_us_per_heartbeat_zadd
        ) / 1e6
        webhooks = deliveries * c.redis_cpu_ms_per_delivery_fleet / 1000.0
        ttl = max(1, int(c.finished_ttl_s))
        done = np.concatenate(([0], np.cumsum(day.finished)))
        within_ttl = done[1:] - done[np.maximum(np.arange(1, horizon + 1) - ttl, 0)]
        memory = (
            queue_len + busy
        ) * c.memory_bytes_per_live_job + within_ttl * c.memory_bytes_per_finished_job
    else:
        raise ValueError(f"unknown design {design!r}; known: {', '.join(DESIGNS)}")
    gets = running_gets + queued_gets
    polling = gets * c.redis_cpu_ms_per_get / 1000.0
    idle = replicas * c.redis_cpu_ms_per_idle_worker_s / 1000.0
    return {
        "per_job_work": per_job,
        "client_polling": polling,
        "queue_position": position,
        "lost_job_recovery": recovery,
        "webhook_delivery": webhooks,
        "idle_workers": idle,
        "_gets_per_s": gets,
        "_jobs_per_s": jobs_per_s,
        "_memory_bytes": memory,
    }


def summarize(day: Day, c: Costs, design: str = "shipped") -> dict[str, Any]:
    s, a = day.scenario, day.autoscaler
    load = redis_load(day, c, design)
    gets_per_s, jobs_per_s, memory = (
        load.pop("_gets_per_s"),
        load.pop("_jobs_per_s"),
        load.pop("_memory_bytes"),
    )
    total = sum(load.values(), np.zeros(len(day.queue_len)))
    api_cores = (jobs_per_s * c.api_cpu_ms_per_submission + gets_per_s * c.api_cpu_ms_per_get) / 1000.0
    waits, queue_len, replicas = day.waits, day.queue_len, day.replicas

    def peak_and_p50(x: np.ndarray) -> dict[str, float]:
        return {"p50": round(float(np.percentile(x[:DAY_S], 50)), 3), "peak": round(float(x.max()), 3)}

    redis_cores = {"total": peak_and_p50(total)} | {name: peak_and_p50(x) for name, x in load.items()}
    targets = {
        "redis_cores_peak": redis_cores["total"]["peak"],
        "recovery_cores_peak": redis_cores["lost_job_recovery"]["peak"],
        "redis_memory_gib_steady_state": round(float(memory.max()) / 1024**3, 2),
    }
    result: dict[str, Any] = {
        "design": design,
        "autoscaler": asdict(a),
        "jobs": int(day.arrivals.sum()),
        "admitted": int(day.admitted.sum()),
        "rejected_queue_full_share": round(
            1 - float(day.admitted.sum()) / max(float(day.arrivals.sum()), 1.0), 4
        ),
        "completed": day.completed,
        "arrival_peak_per_s": round(float(day.rates.max()), 1),
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
            "gpu_hours_provisioned": round(day.replica_seconds / 3600, 1),
        },
        "gpu_utilization": round(day.gpu_busy_s / max(day.replica_seconds, 1), 3),
        "redis_cores": redis_cores,
        "redis_commands_per_s_job_work_peak": round(float((jobs_per_s * c.redis_commands_per_job).max())),
        "client_gets_per_s": peak_and_p50(gets_per_s),
        "api_cores": peak_and_p50(api_cores),
        "redis_memory_gib_steady_state": targets["redis_memory_gib_steady_state"],
        "redis_memory_gib_p50": round(float(np.percentile(memory[:DAY_S], 50)) / 1024**3, 2),
        "webhooks_per_s_peak": round(float((day.finished * s.webhook_share).max()), 1),
        "targets": {
            name: {
                "value": value,
                "target": TARGETS[name],
                "met": value <= TARGETS[name],
                "assumed_inputs": assumed_inputs(c, design, name),
            }
            for name, value in targets.items()
        },
    }
    if design == "shipped":
        scan_bytes = (
            (replicas / s.heartbeat_s) * day.busy * c.redis_bytes_out_per_running_job_per_recovery_pass
        )
        result["redis_recovery_scan_mb_out_per_s_peak"] = round(float(scan_bytes.max()) / 1e6, 1)
    return result


def assumed_inputs(c: Costs, design: str, target: str) -> list[str]:
    """The costs behind ``target`` for ``design`` that no measurement gave."""
    names = []
    for name in TARGET_INPUTS[design][target]:
        if name == "redis_cpu_ms_per_job_fleet":
            if c.redis_cpu_ms_per_job_fixed_at_peak_fleet is not None:
                split = (
                    "redis_cpu_ms_per_job_fixed_at_peak_fleet",
                    "redis_cpu_ms_per_progress_write_at_peak_fleet",
                )
                names += [part for part in split if c.origin(part) == ASSUMED]
            elif c.redis_cpu_ms_per_job_fleet is None or c.origin(name) == ASSUMED:
                names.append(name)
        elif c.origin(name) == ASSUMED:
            names.append(name)
    return names


def print_costs(results: dict[str, Any]) -> None:
    costs = results["costs"]
    print(f"costs: {costs['source']}")
    provenance = costs["provenance"]
    for name, value in costs.items():
        if name in ("source", "provenance"):
            continue
        origin = provenance.get(name, ASSUMED)
        if value is None and name == "redis_cpu_ms_per_job_fixed_at_peak_fleet":
            continue
        if name == "redis_cpu_ms_per_job_fleet" and value is None:
            value, origin = (
                costs["redis_cpu_ms_per_job"],
                f"the shipped per-job cost; the fleet's own: {ASSUMED}",
            )
        flag = f"  <- {origin}" if ASSUMED in origin else ""
        print(f"  {name:<52} {value:>12.4g}{flag}")
    print(f"  (measured unless flagged; sources: {', '.join(sorted(set(provenance.values()))) or 'none'})")


def print_table(results: dict[str, Any]) -> None:
    print_costs(results)
    print(
        f"fleet capacity {results['fleet_capacity_jobs_per_s']} jobs/s; diurnal peak "
        f"{results['scenario']['peak_jobs_per_s']} jobs/s; "
        f"GPU s/image {results['scenario']['gpu_s_per_image']} ({results['scenario']['gpu_s_source']})"
    )
    header = (
        f"{'design':<8} {'fleet':<13} {'wait p50':>9} {'wait p99':>9} {'>60s':>6} {'queue pk':>9} "
        f"{'repl min/max':>13} {'GPU-h':>8} {'util':>5} {'Redis cores p50/peak':>21} "
        f"{'API cores p50/peak':>19} {'503s':>6}"
    )
    print(header)
    for design, runs in results["runs"].items():
        for name, r in runs.items():
            w, rc, ac = r["queue_wait_s"], r["redis_cores"]["total"], r["api_cores"]
            print(
                f"{design:<8} {name:<13} {w['p50']:>8.0f}s {w['p99']:>8.0f}s {w['share_over_60s']:>6.1%} "
                f"{r['queue_peak']:>9} {r['replicas']['min']:>6}/{r['replicas']['max']:<6} "
                f"{r['replicas']['gpu_hours_provisioned']:>8.0f} {r['gpu_utilization']:>5.2f} "
                f"{rc['p50']:>9.2f}/{rc['peak']:<11.2f} {ac['p50']:>8.2f}/{ac['peak']:<10.2f} "
                f"{r['rejected_queue_full_share']:>6.1%}"
            )
    for design, runs in results["runs"].items():
        for name, r in runs.items():
            parts = ", ".join(
                f"{k} {v['p50']:.3f}/{v['peak']:.3f}" for k, v in r["redis_cores"].items() if k != "total"
            )
            print(f"  {design} {name} Redis cores by source (p50/peak): {parts}")
    print_targets(results)


def print_targets(results: dict[str, Any]) -> None:
    """Issue #17's three figures per design and fleet sizing, each against its target."""
    workers = results["scenario"]["workers"]
    print(f"\nissue #17 targets at {workers} workers on this day:")
    labels = {
        "redis_cores_peak": ("Redis cores at the peak second", "cores"),
        "recovery_cores_peak": ("recovery cores (peak)", "cores"),
        "redis_memory_gib_steady_state": ("Redis memory at steady state", "GiB"),
    }
    for design, runs in results["runs"].items():
        for name, r in runs.items():
            print(f"  {design} / {name}:")
            for key, (label, unit) in labels.items():
                t = r["targets"][key]
                verdict = "meets" if t["met"] else "MISSES"
                assumed = (
                    f"  [assumed, not measured: {', '.join(t['assumed_inputs'])}]"
                    if t["assumed_inputs"]
                    else ""
                )
                figure = f"{t['value']:>10.3f} {unit:<5} (target <= {t['target']:g}: {verdict})"
                print(f"    {label:<32} {figure}{assumed}")


def load_costs(inputs: Path | None, extra: list[Path], results_dir: Path = RESULTS_DIR) -> Costs:
    """service.json's costs, then every ``results_dir`` file's ``fleet_sim_inputs`` (by name), then
    ``extra``'s."""
    costs = Costs.from_service(inputs) if inputs and inputs.exists() else Costs()
    for path in sorted(results_dir.glob("*.json")):
        if path not in extra:
            costs.apply_file(path)
    for path in extra:
        if not costs.apply_file(path):
            raise ValueError(f"{path} has no {INPUTS_KEY!r} object")
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_sim", description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=Path, default=RESULTS_DIR / "service.json")
    parser.add_argument(
        "--costs", type=Path, action="append", default=[], help=f"a JSON file with a {INPUTS_KEY!r} object"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help=f"read every *.json here with {INPUTS_KEY!r}"
    )
    parser.add_argument(
        "--design", default=",".join(DESIGNS), help="shipped, fleet or both (comma-separated)"
    )
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
    designs = args.design.split(",")
    for design in designs:
        if design not in DESIGNS:
            parser.error(f"unknown design {design!r}; known: {', '.join(DESIGNS)}")
    costs = load_costs(args.inputs, args.costs, args.results_dir)
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
        "scenario_assumptions": {
            "lost_share": ASSUMED,
            "webhook_share": "worst case: every job has a webhook",
            "retry_after_cap_s": f"{ASSUMED} (fleet design: clients honour Retry-After)",
        },
        "fleet_capacity_jobs_per_s": round(capacity, 1),
        "progress_writes_per_job": round(scenario.progress_writes_per_job(), 2),
        "fleet_redis_cpu_ms_per_job": round(costs.per_job_fleet_ms(scenario.progress_writes_per_job()), 4),
        "runs": {design: {} for design in designs},
    }
    fleets = autoscalers(args.workers)
    for name in args.scenarios.split(","):
        print(f"[sim] {name}", flush=True)
        day = run_day(scenario, fleets[name], costs)
        for design in designs:
            results["runs"][design][name] = summarize(day, costs, design)
    path = write_results(f"fleet-sim-{args.workers}", results, args.out)
    print_table(results)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
