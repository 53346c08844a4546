"""``bench.worker_redis``'s step-loop phase: well-formed, and it shows what the worker sends per step."""

from __future__ import annotations

from pathlib import Path

from bench.worker_redis import step_loop


def test_the_step_loop_reports_a_cost_that_does_not_grow_with_the_steps(tmp_path: Path) -> None:
    short, long = (step_loop(tmp_path / str(n), n, 0.001, jobs=1) for n in (2, 20))
    for loop in (short, long):
        assert loop["per_job"]["commands"] > 0 and loop["worker_hook_ms_per_job"] >= 0
        assert loop["progress_interval_s"] == 1.0
    # No read per step (cancel requests are pushed) and, in well under a second, the first and last
    # progress writes only: 20 steps cost what 2 do.
    assert long["per_job"]["by_command"] == short["per_job"]["by_command"]
