"""The webhook rate benchmark end to end at tiny scale: a real webhook process, both cases, well-formed
results. The figures from such a run mean nothing (a few deliveries on a busy test machine); only that
every event was delivered and measured is checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import webhook_rate


@pytest.mark.slow  # ~30 s: two webhook processes started and stopped
def test_both_cases_deliver_everything_and_report(tmp_path: Path) -> None:
    out = tmp_path / "rate.json"
    argv = ["--events", "30", "--hang-events", "3", "--receivers", "4", "--keys", "4"]
    argv += ["--latency-ms", "20", "--wait", "60", "--out", str(out)]
    assert webhook_rate.main(argv) == 0
    plain, hang = json.loads(out.read_text())["cases"]
    assert (plain["hang"], hang["hang"]) == (False, True)
    for case in (plain, hang):
        assert case["answered"] == 30 and case["missing"] == 0
        assert case["deliveries_per_s"] > 0 and case["deliveries_per_cpu_s"] > 0
        assert case["redis_commands_per_delivery"] > 1
    assert hang["hang_events"] >= 1  # the hanging receiver was really sent to
    assert plain["hang_events"] == 0


def test_steady_rate_counts_the_middle_of_the_run() -> None:
    times = [0.0, *[1.0 + i / 100 for i in range(101)], 10.0]  # start-up and tail outliers
    assert webhook_rate.steady_rate(times) == pytest.approx(100.0, rel=0.05)
    assert webhook_rate.steady_rate([1.0, 2.0]) != webhook_rate.steady_rate([1.0, 2.0])  # NaN: too few
