"""``python -m bench.profile_api``: where the API's CPU goes per request, sampled with py-spy under load.

Starts Redis and the API (production settings, one uvicorn worker, no GPU worker), drives closed-loop
``POST /v1/generations`` (or ``GET``) load at it, and samples the API process with ``py-spy record`` for a few
seconds. Prints the functions with the most inclusive and self time (share of samples) and writes the raw
collapsed stacks (flamegraph input) next to the results. py-spy is a profiling tool, not a dependency of
darkroom: ``pip install py-spy`` first.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from bench.api_load import _host_port, submission_request
from bench.common import RESULTS_DIR
from bench.http_load import build_request, closed_loop, run
from bench.stack import bench_stack


def aggregate(collapsed: str, top: int = 30) -> dict[str, Any]:
    """Inclusive and self share of samples per function, from py-spy's ``--format raw`` output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [frame.split(" (")[0] + " " + _short_file(frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "inclusive_pct": share(inclusive), "self_pct": share(own)}


def _short_file(frame: str) -> str:
    if "(" not in frame:
        return ""
    location = frame.split("(", 1)[1].rstrip(")")
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in location:
            location = location.split(marker, 1)[1]
    return f"({location})"


def profile(kind: str, seconds: float, rate: int, out_dir: Path, top: int = 30) -> dict[str, Any]:
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="darkroom-profile-"))
    try:
        with bench_stack(tmp, worker=False, webhooks=False) as stack:
            host, port = _host_port(stack.api_url)
            if kind == "post":
                raw = submission_request(f"{host}:{port}", stack.auth())
            else:
                import httpx

                job = httpx.post(
                    f"{stack.api_url}/v1/generations", json={"prompt": "x"}, headers=stack.auth()
                ).json()
                raw = build_request(
                    "GET", f"/v1/generations/{job['id']}", f"{host}:{port}", headers=stack.auth()
                )
            run(closed_loop(host, port, lambda i: raw, concurrency=16, max_requests=300, max_seconds=20))
            out = out_dir / f"profile-api-{kind}.txt"
            recorder = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(stack.pid("api")),
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--nonblocking",
                    "--gil",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            done = threading.Event()
            result: dict[str, Any] = {}

            def load() -> None:
                res = run(
                    closed_loop(
                        host,
                        port,
                        lambda i: raw,
                        concurrency=16,
                        max_requests=1_000_000,
                        max_seconds=seconds + 1,
                    )
                )
                result.update(res.report())
                done.set()

            thread = threading.Thread(target=load)
            thread.start()
            recorder.wait(timeout=seconds + 60)
            thread.join(timeout=seconds + 30)
            report: dict[str, Any] = (
                aggregate(out.read_text(), top)
                if out.exists()
                else {"error": recorder.stderr.read().decode() if recorder.stderr else ""}
            )
            report["load"] = {k: result.get(k) for k in ("completed", "throughput_per_s", "statuses")}
            report["collapsed_stacks"] = str(out)
            return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_api", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["post", "get"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    report = profile(args.kind, args.seconds, args.rate, RESULTS_DIR, args.top)
    print(f"load: {report.get('load')}  samples: {report.get('samples')}")
    print("\n-- inclusive % of API samples --")
    for name, pct in report.get("inclusive_pct", [])[: args.top]:
        print(f"{pct:6.1f}  {name}")
    print("\n-- self % --")
    for name, pct in report.get("self_pct", [])[: args.top]:
        print(f"{pct:6.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
