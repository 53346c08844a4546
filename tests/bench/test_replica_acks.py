"""``bench/replica_acks.py`` at tiny scale: against a real primary and replica, results of the right shape."""

from __future__ import annotations

import json
from pathlib import Path

from bench import replica_acks


def test_the_benchmark_measures_both_settings(tmp_path: Path) -> None:
    out = tmp_path / "replica-acks.json"
    replica_acks.main(["--jobs", "20", "--rounds", "1", "--concurrency", "4", "--out", str(out)])
    results = json.loads(out.read_text())
    assert set(results["runs"]) == {"acks_0", "acks_1"}
    for [run] in results["runs"].values():
        assert run["sequential_ms"]["n"] == 10 and run["concurrent_4_ms"]["n"] == 10
        assert run["finish_ms"]["n"] == 20 and run["concurrent_4_per_s"] > 0
    assert results["command"].startswith("python -m bench.replica_acks")
