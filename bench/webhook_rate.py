"""``python -m bench.webhook_rate``: deliveries per second from ONE webhook process, receivers answering
after 150 ms, with and without a hanging receiver (issue #17).

A private Redis; ``--events`` jobs finished through the real lifecycle before the webhook process starts
(their events wait in the outbox), spread round-robin over ``--receivers`` loopback receivers (one port
each: one "host" to the per-host share) and ``--keys`` API keys. Then ``python -m services.webhooks``
starts and the bench counts the answers the receivers send (``devtools.rate_receiver``: asyncio, one
timer per request, so the receiver is not the bottleneck).

- **rate**: answers per second between the 10th and the 90th percentile of answer times (start-up and
  the tail excluded);
- **hang case**: the same, plus ``--hang-events`` events of one more API key to one receiver that reads
  the request and never answers — the others' rate should not drop;
- **deliveries per CPU-second** of the webhook process (user + system): what it would deliver with a
  core to itself — the machine this runs on is shared, so the rate alone says little;
- **Redis commands and Redis CPU per delivery**: ``total_commands_processed`` and ``used_cpu_user`` +
  ``used_cpu_sys`` (``INFO``) over the run / answers (the webhook process's start-up and idle polling
  included, and Redis's own background cron; the bench's job creation excluded): the delivery input of
  ``bench.fleet_sim``.

The webhook process runs as the Kubernetes manifests run it: with ``DARKROOM_ARCHIVER_IN_WEBHOOK_PROCESS``
false (the archiver is a process of its own there; here it does not run). ``--archiver-in-process`` runs it
inside, as compose and ``make run`` do: its storage write per finished job then shares the process's CPU.
Extra settings for the webhook process: ``--env DARKROOM_X=value`` (e.g. concurrency). Results go to
``bench/results/webhook-rate.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
from redis import Redis

from bench.common import ROOT, cpu_seconds, machine_facts, percentile, write_results
from bench.isolation_webhooks import scratch_settings, worker_env
from devtools.rate_receiver import RateReceivers
from services.clients import build_clients
from services.settings import Settings
from services.storage import FileStorage
from tests.services.test_webhook_tasks import create_job


def steady_rate(times: list[float]) -> float:
    """Answers per second between the 10th and 90th percentile of ``times`` (NaN with too few)."""
    if len(times) < 10:
        return float("nan")
    lo, hi = percentile(times, 10), percentile(times, 90)
    inside = sum(1 for t in times if lo <= t <= hi)
    return inside / (hi - lo) if hi > lo else float("nan")


def user_and_system_s(pid: int) -> tuple[float, float]:
    """CPU seconds ``pid`` spent in Python and libraries (user) and in the kernel (system: sockets)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def commands(redis: Redis) -> int:
    return int(redis.info("stats")["total_commands_processed"])


def redis_cpu_s(redis: Redis) -> float:
    """CPU seconds the Redis server has used (user + system), as it reports them."""
    cpu = redis.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def run_case(settings: Settings, args: argparse.Namespace, hang: bool, tmp: Path) -> dict[str, Any]:
    clients = build_clients(settings)
    clients.redis.flushall()
    storage = clients.storage
    assert isinstance(storage, FileStorage)
    overrides = {"DARKROOM_ARCHIVER_IN_WEBHOOK_PROCESS": str(args.archiver_in_process).lower()}
    overrides.update(item.split("=", 1) for item in args.env)
    receivers = RateReceivers(args.receivers, hang_ports=1 if hang else 0, delay_s=args.latency_ms / 1000)
    logs = args.log_dir or tmp
    with open(logs / f"webhooks-{'hang' if hang else 'plain'}.err", "wb") as err, receivers:
        hang_every = max(1, args.events // args.hang_events) if hang and args.hang_events else 0
        created = time.monotonic()
        for i in range(args.events):
            url = receivers.ok_urls[i % args.receivers]
            create_job(clients, storage, url, owner=f"key-{i % args.keys}")
            if hang_every and i % hang_every == 0:
                create_job(clients, storage, receivers.hang_urls[0], owner="key-hang")
        created_s = time.monotonic() - created
        before, cpu_before = commands(clients.redis), redis_cpu_s(clients.redis)
        started = time.monotonic()
        worker = subprocess.Popen(
            [sys.executable, "-m", "services.webhooks"],
            cwd=ROOT,
            env=worker_env(settings, overrides),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = started + args.wait
            while receivers.answered < args.events and time.monotonic() < deadline:
                time.sleep(0.05)
            after, cpu_after = commands(clients.redis), redis_cpu_s(clients.redis)
            times = list(receivers.answered_at)
            cpu_s = cpu_seconds([worker.pid])
            user_s, system_s = user_and_system_s(worker.pid)
            wall_s = time.monotonic() - started
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
            clients.close()
    answered = len(times)
    return {
        "hang": hang,
        "events": args.events,
        "hang_events": receivers.arrived["hang"] if hang else 0,
        "answered": answered,
        "missing": args.events - answered,
        "deliveries_per_s": steady_rate(times),
        "first_answer_s": (times[0] - started) if times else None,
        "all_answered_s": (times[-1] - started) if times else None,
        "redis_commands_per_delivery": (after - before) / answered if answered else None,
        "redis_cpu_ms_per_delivery": (cpu_after - cpu_before) * 1000 / answered if answered else None,
        # Load-independent: what one process would deliver per second with a whole core to itself (its
        # start-up and idle polls included, so a lower bound).
        "webhook_process_cpu_s": cpu_s,
        "webhook_process_user_s": user_s,
        "webhook_process_system_s": system_s,
        "webhook_process_cores": cpu_s / wall_s,
        "deliveries_per_cpu_s": answered / cpu_s if cpu_s else None,
        "create_s": created_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_rate", description=__doc__)
    parser.add_argument("--events", type=int, default=3000, help="events to the answering receivers")
    parser.add_argument("--hang-events", type=int, default=100, help="events to the hanging receiver")
    parser.add_argument("--receivers", type=int, default=128, help="answering receivers (ports)")
    parser.add_argument("--keys", type=int, default=64, help="API keys the events are spread over")
    parser.add_argument("--latency-ms", type=float, default=150.0, help="receivers answer after this")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for all answers")
    parser.add_argument("--cases", default="plain,hang", help="plain, hang or both (comma-separated)")
    parser.add_argument("--env", action="append", default=[], help="DARKROOM_X=value for the worker")
    parser.add_argument(
        "--archiver-in-process", action="store_true", help="archive finished jobs in the webhook process too"
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the webhook process's stderr here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    facts = machine_facts()
    with tempfile.TemporaryDirectory(prefix="bench-rate-") as name, scratch_settings(Path(name)) as settings:
        cases = [run_case(settings, args, case == "hang", Path(name)) for case in args.cases.split(",")]
    for case in cases:
        print(
            f"{'hanging receiver' if case['hang'] else 'all answering  '}: "
            f"{case['deliveries_per_s']:.0f} deliveries/s "
            f"({case['answered']}/{case['events']} answered, all in {case['all_answered_s'] or 0:.1f} s; "
            f"{case['redis_commands_per_delivery'] or 0:.1f} Redis commands and "
            f"{case['redis_cpu_ms_per_delivery'] or 0:.3f} ms of Redis CPU per delivery; "
            f"{case['deliveries_per_cpu_s'] or 0:.0f} deliveries per CPU-second of the webhook process, "
            f"which used {case['webhook_process_cores']:.2f} cores)"
        )
    plain_args = vars(args) | {"out": None, "log_dir": None}
    path = write_results("webhook-rate", {"machine": facts, "args": plain_args, "cases": cases}, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
