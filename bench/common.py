"""What every benchmark shares: machine facts, percentiles, PASS/FAIL bars, CPU accounting, results files.

A benchmark is only as good as the record of where it ran: every result carries the date, the machine
(cores, CPU model, memory, load average before and after), the versions and the exact command line.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- statistics ----------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summary(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """n, mean, p50, p90, p95, p99, min, max of ``values`` times ``scale`` (e.g. 1000 for s -> ms)."""
    if not values:
        return {"n": 0}
    scaled = [v * scale for v in values]
    return {
        "n": len(scaled),
        "mean": sum(scaled) / len(scaled),
        "p50": percentile(scaled, 50),
        "p90": percentile(scaled, 90),
        "p95": percentile(scaled, 95),
        "p99": percentile(scaled, 99),
        "min": min(scaled),
        "max": max(scaled),
    }


# --- targets -------------------------------------------------------------------------------------------


@dataclass
class Bar:
    """One target from the issue: ``value op target``; ``value=None`` means not measured here."""

    name: str
    value: float | None
    op: str  # "<=" or ">="
    target: float
    unit: str
    note: str = ""
    applies: bool = True  # False: measured, but not in the target's configuration (e.g. tiny model on CPU)

    @property
    def status(self) -> str:
        if self.value is None or math.isnan(self.value):
            return "NOT MEASURED"
        if not self.applies:
            return "INFO"
        passed = self.value <= self.target if self.op == "<=" else self.value >= self.target
        return "PASS" if passed else "FAIL"

    def line(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.4g}"
        note = f"  ({self.note})" if self.note else ""
        return f"{self.status:<12} {self.name}: {shown} {self.unit} (target {self.op} {self.target:g}){note}"


def print_bars(bars: Iterable[Bar], stream: Any = None) -> None:
    stream = stream or sys.stdout
    print("\n== targets ==", file=stream)
    for bar in bars:
        print(bar.line(), file=stream)
    stream.flush()


# --- the machine ---------------------------------------------------------------------------------------


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}" if head else "unknown"


def machine_facts() -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": memory_gib(),
        "load_average": [round(x, 2) for x in load_average()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_revision(),
        "versions": {
            name: _version(name)
            for name in ("torch", "diffusers", "transformers", "fastapi", "uvicorn", "redis", "rq", "httpx")
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def wait_for_quiet(max_load: float, timeout_s: float, poll_s: float = 30.0) -> dict[str, Any]:
    """Wait (bounded) until the 1-minute load average is at most ``max_load``; report what happened."""
    started = time.monotonic()
    waited_for = []
    while True:
        one_minute = load_average()[0]
        waited_for.append(round(one_minute, 2))
        if one_minute <= max_load:
            return {"quiet": True, "waited_s": round(time.monotonic() - started), "load_1m": one_minute}
        if time.monotonic() - started + poll_s > timeout_s:
            return {"quiet": False, "waited_s": round(time.monotonic() - started), "load_1m": one_minute}
        print(f"[bench] load average {one_minute:.2f} > {max_load}: waiting {poll_s:.0f}s", flush=True)
        time.sleep(poll_s)


# --- CPU accounting from /proc -------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            found += [int(child) for child in text]
    except OSError:
        pass
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn's supervisor and its worker processes, for one)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (each alone, not their reaped children)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
    return total


class CpuMeter:
    """CPU seconds used by named process trees between ``start()`` and ``stop()``."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self._before: dict[str, float] = {}
        self._wall = 0.0
        self.used: dict[str, float] = {}
        self.wall_s = 0.0

    def _sample(self) -> dict[str, float]:
        sample = {name: cpu_seconds(process_tree(pid)) for name, pid in self.roots.items()}
        sample["loadgen"] = cpu_seconds([os.getpid()])
        return sample

    def start(self) -> CpuMeter:
        self._before = self._sample()
        self._wall = time.perf_counter()
        return self

    def stop(self) -> dict[str, float]:
        after = self._sample()
        self.wall_s = time.perf_counter() - self._wall
        self.used = {name: round(after[name] - self._before.get(name, 0.0), 3) for name in after}
        return self.used

    def cores(self) -> dict[str, float]:
        """Average cores busy per process tree over the interval."""
        return {name: round(used / self.wall_s, 3) for name, used in self.used.items()} if self.wall_s else {}


# --- results -------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Bar):
        return {**asdict(value), "status": value.status}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_results(name: str, results: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``results`` as JSON to ``out`` (default ``bench/results/<name>.json``); returns the path."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(results), indent=2, sort_keys=False) + "\n")
    return path


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
