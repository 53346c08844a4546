"""The fleet simulation: FIFO waits from counts, whole days on a small fleet under each autoscaler, the
shipped and fleet designs' cost models, and where each cost came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.fleet_sim import (
    ASSUMED,
    INPUTS_KEY,
    Autoscaler,
    Costs,
    Day,
    Scenario,
    assumed_inputs,
    autoscalers,
    fifo_waits,
    main,
    queued_gets_per_s,
    redis_load,
    run_day,
    simulate,
    summarize,
)


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


def test_hpa_steps_round_as_the_hpa_does() -> None:
    remedy = autoscalers(1000)["keda-remedy"]
    assert remedy.up_step(300) == 300  # 100 %
    assert remedy.up_step(40) == 100  # or 100 pods, whichever is more
    assert remedy.down_step(1000) == 100  # 10 %
    # A Percent scale-down limit rounds the remaining pods down: a small fleet still loses one.
    assert remedy.down_step(5) == 1
    shipped = autoscalers(1000)["keda-shipped"]
    assert (shipped.up_step(500), shipped.down_step(500)) == (2, 1)


def test_the_fleet_design_changes_costs_not_the_queue() -> None:
    scenario = Scenario(workers=40, peak_jobs_per_s=8.0, bursts=2)
    costs = Costs()
    day = run_day(scenario, autoscalers(40)["fixed"], costs)
    shipped, fleet = summarize(day, costs, "shipped"), summarize(day, costs, "fleet")
    assert shipped["queue_wait_s"] == fleet["queue_wait_s"]
    assert shipped["replicas"] == fleet["replicas"]
    # Recovery: every worker reading every running job vs one pass per fleet.
    assert (
        fleet["redis_cores"]["lost_job_recovery"]["peak"]
        < shipped["redis_cores"]["lost_job_recovery"]["peak"]
    )
    # Memory: a week of records vs what is live plus a few minutes of finished jobs.
    assert fleet["redis_memory_gib_steady_state"] < shipped["redis_memory_gib_steady_state"]
    for run in (shipped, fleet):
        assert set(run["targets"]) == {
            "redis_cores_peak",
            "recovery_cores_peak",
            "redis_memory_gib_steady_state",
        }
        assert run["targets"]["redis_cores_peak"]["value"] == run["redis_cores"]["total"]["peak"]
    with pytest.raises(ValueError, match="unknown design"):
        summarize(day, costs, "sharded")


def _day(queue: list[int], busy: list[int], replicas: list[int], finished: list[int]) -> Day:
    n = len(queue)
    scenario = Scenario(workers=max(replicas), heartbeat_s=5.0, poll_s=2.0, lost_share=0.5, webhook_share=1.0)
    return Day(
        scenario=scenario,
        autoscaler=Autoscaler("fixed", max(replicas), max(replicas), fixed=True),
        rates=np.zeros(n),
        arrivals=np.zeros(n, dtype=np.int64),
        admitted=np.zeros(n, dtype=np.int64),
        waits=np.zeros(0),
        queue_len=np.array(queue, dtype=np.int64),
        busy=np.array(busy, dtype=np.int64),
        replicas=np.array(replicas, dtype=np.int64),
        finished=np.array(finished, dtype=np.int64),
        gpu_busy_s=0.0,
        replica_seconds=0,
        completed=0,
        mean_service_s=4.0,
    )


def test_fleet_design_recovery_and_memory_by_hand() -> None:
    costs = Costs(
        redis_us_per_lease_try=10.0,
        redis_us_per_recovery_pass=50.0,
        redis_us_per_lost_job=200.0,
        redis_us_per_heartbeat_zadd=4.0,
        memory_bytes_per_live_job=1000.0,
        memory_bytes_per_finished_job=100.0,
        finished_ttl_s=3.0,
    )
    day = _day(queue=[0, 2, 0, 0, 0], busy=[4, 4, 4, 4, 0], replicas=[5] * 5, finished=[2, 0, 0, 0, 4])
    load = redis_load(day, costs, "fleet")
    # 5 replicas try the lease every 5 s, one pass every 5 s, lost = finished x 0.5, 4 running beat every 5 s.
    expected_us = (
        5 / 5 * 10 + 1 / 5 * 50 + np.array([1, 0, 0, 0, 2]) * 200 + np.array([4, 4, 4, 4, 0]) / 5 * 4
    )
    assert np.allclose(load["lost_job_recovery"], expected_us / 1e6)
    # Live (queued + running) x 1000 B + finished in the last 3 s x 100 B.
    within_ttl = np.array([2, 2, 2, 0, 4])
    assert np.allclose(load["_memory_bytes"], (np.array([4, 6, 4, 4, 0]) * 1000 + within_ttl * 100))
    # Shipped: every replica's pass reads every running job.
    shipped = redis_load(day, costs, "shipped")
    scans = 5 / 5 * 4 * costs.redis_cpu_us_per_running_job_per_recovery_pass
    assert shipped["lost_job_recovery"][2] == pytest.approx(scans / 1e6)


def test_queued_gets_follow_retry_after() -> None:
    """The closed form equals the sum over positions of 1 / max(poll, min(cap, position / drain))."""
    for queued, drain in ((5000, 100.0), (300, 100.0), (20_000, 50.0), (0, 10.0)):
        brute = sum(1 / max(2.0, min(60.0, p / drain)) for p in range(1, queued + 1))
        closed = float(queued_gets_per_s(np.array([queued]), np.array([drain]), 2.0, 60.0)[0])
        assert closed == pytest.approx(brute, rel=0.01, abs=0.5), (queued, drain)
    # Far fewer GETs than polling every 2 s once the queue is long.
    assert queued_gets_per_s(np.array([10_000]), np.array([250.0]), 2.0, 60.0)[0] < 10_000 / 2 / 3


def test_costs_say_which_were_measured(tmp_path: Path) -> None:
    costs = Costs()
    assert costs.origin("redis_us_per_heartbeat_zadd") == ASSUMED
    measured = tmp_path / "primitives.json"
    measured.write_text(json.dumps({INPUTS_KEY: {"redis_us_per_heartbeat_zadd": 7.5}, "other": 1}))
    assert costs.apply_file(measured)
    assert costs.redis_us_per_heartbeat_zadd == 7.5
    assert costs.origin("redis_us_per_heartbeat_zadd") == f"measured: {measured}"
    unrelated = tmp_path / "unrelated.json"
    unrelated.write_text(json.dumps({"runs": {}}))
    assert not costs.apply_file(unrelated)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({INPUTS_KEY: {"redis_us_per_heartbat_zadd": 1}}))
    with pytest.raises(ValueError, match="unknown"):
        costs.apply_file(bad)


def test_report_prints_the_three_targets_and_flags_assumptions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    measured = tmp_path / "primitives.json"
    measured.write_text(json.dumps({INPUTS_KEY: {"redis_us_per_heartbeat_zadd": 7.5}}))
    out = tmp_path / "sim.json"
    argv = ["--inputs", str(tmp_path / "absent.json"), "--results-dir", str(tmp_path / "none")]
    argv += ["--costs", str(measured), "--workers", "20"]
    assert main([*argv, "--scenarios", "fixed", "--peak", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("Redis cores at the peak second", "recovery cores", "Redis memory at steady state"):
        assert printed.count(label) == 2, label  # once per design
    assert ASSUMED in printed
    results = json.loads(out.read_text())
    fleet = results["runs"]["fleet"]["fixed"]["targets"]
    assert "redis_us_per_heartbeat_zadd" not in fleet["recovery_cores_peak"]["assumed_inputs"]
    assert "redis_us_per_recovery_pass" in fleet["recovery_cores_peak"]["assumed_inputs"]
    assert results["costs"]["provenance"]["redis_us_per_heartbeat_zadd"] == f"measured: {measured}"


def test_a_job_measured_at_the_peak_costs_its_fixed_part_plus_its_progress_writes() -> None:
    """1 image at 2.2 s: first step, writes at ~1 s and ~2 s, last step (4); 4 images at 8.8 s: 10."""
    scenario = Scenario(gpu_s_per_image=2.2)
    assert scenario.progress_writes_per_job() == pytest.approx(0.75 * 4 + 0.25 * 10)
    costs = Costs(redis_cpu_ms_per_job=3.0, redis_cpu_ms_per_job_fleet=2.0)
    assert costs.per_job_fleet_ms(5.5) == 2.0  # measured alone: one figure, whatever the run's length
    costs.apply(
        {
            "redis_cpu_ms_per_job_fixed_at_peak_fleet": 0.7,
            "redis_cpu_ms_per_progress_write_at_peak_fleet": 0.05,
        },
        "measured: replay.json",
    )
    assert costs.per_job_fleet_ms(5.5) == pytest.approx(0.7 + 5.5 * 0.05)
    assert "redis_cpu_ms_per_job_fleet" not in assumed_inputs(costs, "fleet", "redis_cores_peak")
