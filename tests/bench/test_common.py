"""The benchmark helpers: percentiles, targets, CPU accounting."""

from __future__ import annotations

import math
import os

from bench.common import Bar, cpu_seconds, machine_facts, percentile, process_tree, summary


def test_percentile_interpolates_like_numpy() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 95) == 4.8
    assert math.isnan(percentile([], 50))


def test_summary_scales() -> None:
    result = summary([0.001, 0.002, 0.003], 1000.0)
    assert result["n"] == 3
    assert result["p50"] == 2.0
    assert result["max"] == 3.0


def test_bar_status() -> None:
    assert Bar("x", 10.0, "<=", 25.0, "ms").status == "PASS"
    assert Bar("x", 30.0, "<=", 25.0, "ms").status == "FAIL"
    assert Bar("x", 1200.0, ">=", 1000.0, "/s").status == "PASS"
    assert Bar("x", None, ">=", 1000.0, "/s").status == "NOT MEASURED"
    assert Bar("x", 1.0, ">=", 1.5, "x", applies=False).status == "INFO"
    assert Bar("x", 30.0, "<=", 25.0, "ms").line().startswith("FAIL")


def test_cpu_accounting_sees_this_process() -> None:
    assert os.getpid() in process_tree(os.getpid())
    assert cpu_seconds([os.getpid()]) > 0


def test_machine_facts_are_recorded() -> None:
    facts = machine_facts()
    for key in ("date", "nproc", "cpu_model", "memory_gib", "load_average", "git", "versions", "command"):
        assert key in facts
