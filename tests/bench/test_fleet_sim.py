"""The fleet simulation: FIFO waits from counts, and whole days on a small fleet under each autoscaler."""

from __future__ import annotations

import numpy as np

from bench.fleet_sim import Costs, Scenario, autoscalers, fifo_waits, simulate


def test_fifo_waits_from_counts() -> None:
    arrivals = np.array([2, 0, 1, 0])
    starts = np.array([1, 1, 0, 1])
    assert fifo_waits(arrivals, starts).tolist() == [0.0, 1.0, 1.0]


def test_small_fleet_day_under_each_autoscaler() -> None:
    scenario = Scenario(workers=20, peak_jobs_per_s=3.0, bursts=2)
    fleets = autoscalers(20)
    runs = {name: simulate(scenario, fleets[name], Costs()) for name in ("fixed", "keda-shipped")}
    for run in runs.values():
        assert run["completed"] == run["admitted"] > 0
        waits = run["queue_wait_s"]
        assert 0 <= waits["p50"] <= waits["p99"] <= waits["max"]
        assert run["redis_cores"]["total"]["peak"] > 0
    assert runs["fixed"]["replicas"]["min"] == 20
    # Scaling from one pod at two pods a minute cannot keep up with a fixed warm fleet.
    assert runs["keda-shipped"]["queue_wait_s"]["p99"] >= runs["fixed"]["queue_wait_s"]["p99"]
