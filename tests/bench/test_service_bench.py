"""The CPU benchmark end to end at tiny scale: a real stack, every phase once, well-formed results.

Figures from this run mean nothing (a few requests on a busy test machine); only their shape is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import service


@pytest.mark.slow  # ~75 s: a whole stack plus every phase; `make test-all` runs it
def test_every_phase_runs_and_reports(tmp_path: Path, tiny_model_dir: Path, tiny_engine: Any) -> None:
    results = service.run_all(service.Plan.quick(), tmp_path, quick=True, engine=tiny_engine)

    overhead = results["overhead"]
    assert overhead["difference_ms"]["n"] == 1
    assert set(overhead["phases_ms"]) >= {"submit_s", "pickup_s", "engine_s", "notify_s"}

    redis = results["redis"]
    assert redis["job"]["net"]["commands"] > 10
    monitor = redis["job_with_webhook_monitor"]
    assert {"api", "worker", "webhooks"} <= set(monitor["by_process"])
    assert redis["memory_per_job"]["total_bytes"] > 0
    assert redis["recovery_pass"]["commands"] < redis["recovery_pass"]["running"]  # O(lost): none here
    assert redis["lpos"]["by_position"]

    api = results["api"]["1"]
    assert api["submissions"]["accepted"] > 0
    assert api["submissions"]["statuses"] == {"202": api["submissions"]["completed"]}
    assert api["gets"]["statuses"] == {"200": api["gets"]["completed"]}
    assert results["capacity"]["redis_jobs_per_s_at_100pct"] > 0

    bars = service.bars(results)
    assert len(bars) == 3
    assert all(bar.status in {"PASS", "FAIL"} for bar in bars)
