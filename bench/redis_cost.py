"""What one job costs Redis, measured: commands, bytes and Redis CPU per job, per submission, per read, per
idle worker, per lost-job recovery pass, per queue-position lookup, and memory per retained job.

Sources: ``INFO commandstats`` / ``INFO stats`` / ``INFO cpu`` deltas around a known amount of work (with the
background rate of idle processes measured separately and subtracted), and ``MONITOR`` for one job, with
each command attributed to the process that sent it (client port -> socket inode -> pid via ``/proc``).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import process_tree
from devtools.net import LOOPBACK
from devtools.stack import Stack

MONITOR_STOP = "darkroom-bench-monitor-stop"


# --- INFO snapshots ------------------------------------------------------------------------------------


@dataclass
class RedisSnapshot:
    at: float
    calls: dict[str, int]
    usec: dict[str, int]
    net_in: int
    net_out: int
    cpu_s: float
    used_memory: int
    reads: int = 0  # read events on client sockets: about one per round trip (a pipeline is one)

    @classmethod
    def take(cls, client: redis.Redis) -> RedisSnapshot:
        stats = client.info("commandstats")
        calls, usec = {}, {}
        for key, value in stats.items():
            name = key.removeprefix("cmdstat_")
            calls[name] = int(value["calls"])
            usec[name] = int(value["usec"])
        info = client.info()
        return cls(
            at=time.perf_counter(),
            calls=calls,
            usec=usec,
            net_in=int(info["total_net_input_bytes"]),
            net_out=int(info["total_net_output_bytes"]),
            cpu_s=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            used_memory=int(info["used_memory"]),
            reads=int(info.get("total_reads_processed", 0)),
        )

    @classmethod
    def between(cls, client: redis.Redis) -> tuple[int, int]:
        """Net bytes (in, out) that one snapshot adds to the next interval: its own INFO replies."""
        first, second, third = cls.take(client), cls.take(client), cls.take(client)
        return (
            ((second.net_in - first.net_in) + (third.net_in - second.net_in)) // 2,
            ((second.net_out - first.net_out) + (third.net_out - second.net_out)) // 2,
        )


# The snapshot itself runs INFO twice; those calls are ours, not the workload's.
_SNAPSHOT_COMMANDS = {"info": 2}
# Bytes one snapshot's own INFO traffic adds to an interval, per Redis URL (measured once, see ``between``).
_SNAPSHOT_BYTES: dict[str, tuple[int, int]] = {}


def calibrate(client: redis.Redis) -> None:
    kwargs = client.connection_pool.connection_kwargs
    _SNAPSHOT_BYTES[f"{kwargs.get('host')}:{kwargs.get('port')}"] = RedisSnapshot.between(client)


def snapshot(client: redis.Redis) -> RedisSnapshot:
    """A snapshot whose INFO traffic is calibrated out of the deltas it takes part in."""
    kwargs = client.connection_pool.connection_kwargs
    key = f"{kwargs.get('host')}:{kwargs.get('port')}"
    if key not in _SNAPSHOT_BYTES:
        calibrate(client)
    taken = RedisSnapshot.take(client)
    taken.net_in -= _SNAPSHOT_BYTES[key][0] * _snapshot_count(key)
    taken.net_out -= _SNAPSHOT_BYTES[key][1] * _snapshot_count(key)
    return taken


_COUNTS: dict[str, int] = {}


def _snapshot_count(key: str) -> int:
    _COUNTS[key] = _COUNTS.get(key, 0) + 1
    return _COUNTS[key]


def delta(before: RedisSnapshot, after: RedisSnapshot, per: float = 1.0) -> dict[str, Any]:
    """Per-unit difference (``per`` = number of jobs, requests, seconds...); snapshots from ``snapshot``."""
    calls = {
        name: (after.calls.get(name, 0) - before.calls.get(name, 0) - _SNAPSHOT_COMMANDS.get(name, 0))
        for name in after.calls
    }
    calls = {name: n for name, n in calls.items() if n > 0}
    usec = {name: after.usec.get(name, 0) - before.usec.get(name, 0) for name in calls}
    return {
        "commands": round(sum(calls.values()) / per, 2),
        "by_command": {name: round(n / per, 2) for name, n in sorted(calls.items(), key=lambda kv: -kv[1])},
        "command_usec": round(sum(usec.values()) / per, 1),  # time inside command handlers only
        "bytes_in": round(max(0, after.net_in - before.net_in) / per, 1),
        "bytes_out": round(max(0, after.net_out - before.net_out) / per, 1),
        "cpu_ms": round((after.cpu_s - before.cpu_s) * 1000.0 / per, 4),  # whole process: I/O included
        # Round trips, less the snapshot's own INFO pair (two reads, as for its commands).
        "round_trips": round(max(0, after.reads - before.reads - 2) / per, 2),
        "wall_s": round(after.at - before.at, 3),
    }


def subtract(
    job: dict[str, Any], background_per_s: dict[str, Any], seconds: float, per: float
) -> dict[str, Any]:
    """``job`` (per unit) minus the idle background that ran during ``seconds`` of wall time."""
    share = seconds / per
    adjusted = dict(job)
    for key in ("commands", "bytes_in", "bytes_out", "cpu_ms", "command_usec", "round_trips"):
        if key not in job or key not in background_per_s:
            continue
        adjusted[key] = round(max(0.0, job[key] - background_per_s[key] * share), 4)
    by_command = {}
    for name, n in job["by_command"].items():
        by_command[name] = round(max(0.0, n - background_per_s["by_command"].get(name, 0.0) * share), 2)
    adjusted["by_command"] = {k: v for k, v in by_command.items() if v > 0}
    return adjusted


# --- who sent what: client ports -> processes ----------------------------------------------------------


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink().as_posix()
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def port_owners(processes: dict[str, int]) -> dict[int, str]:
    """Local TCP port -> process name, for the loopback connections of each named process tree."""
    owner_of_inode = {}
    for name, root in processes.items():
        for pid in process_tree(root):
            for inode in _socket_inodes(pid):
                owner_of_inode[inode] = name
    ports = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, inode = fields[1], fields[9]
            if inode in owner_of_inode:
                ports[int(local.rsplit(":", 1)[1], 16)] = owner_of_inode[inode]
    return ports


_TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b", b'"': b'"', b"\\": b"\\"}


def unescape(token: bytes) -> bytes:
    """A ``MONITOR`` argument as sent (Redis prints them with ``sdscatrepr``'s escapes)."""
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i : i + 1] == b"\\" and i + 1 < len(token):
            nxt = token[i + 1 : i + 2]
            if nxt == b"x" and i + 3 < len(token):
                out.append(int(token[i + 2 : i + 4], 16))
                i += 4
                continue
            out += _ESCAPES.get(nxt, nxt)
            i += 2
            continue
        out.append(token[i])
        i += 1
    return bytes(out)


@dataclass
class Captured:
    """One ``MONITOR`` line: when Redis ran it (its clock), from which client port (0: a Lua script's own
    call, ``lua``), and its exact arguments."""

    at: float
    port: int
    args: list[bytes]
    lua: bool = False

    @property
    def line(self) -> str:
        return " ".join(arg.decode("utf-8", "replace") for arg in self.args)


class Monitor:
    """``MONITOR`` in a side thread until :meth:`stop`; commands attributed to processes by client port.
    Every argument is kept byte for byte (``captured``: redis-py's ``next_command`` joins them with
    spaces, which ``bench.job_replay`` could not split back to replay them)."""

    def __init__(self, url: str, processes: dict[str, int]) -> None:
        self.url = url
        self.processes = processes
        self.captured: list[Captured] = []
        self.owners: dict[int, str] = {}  # client port -> process, read at stop()
        self.commands: list[tuple[str, str]] = []  # (process, command line)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)
        self.ports: list[int] = []
        self.times: list[float] = []  # Redis's own clock, one per entry of ``commands``

    def _run(self) -> None:
        client = redis.Redis.from_url(self.url)
        with client.monitor() as monitor:
            self._ready.set()
            while True:
                raw = monitor.connection.read_response()
                line = raw if isinstance(raw, bytes) else str(raw).encode()
                stamp, _, rest = line.partition(b" ")
                client_info = rest[rest.find(b" ") + 1 : rest.find(b"]")]
                args = [unescape(token) for token in _TOKEN.findall(rest[rest.find(b"]") + 1 :])]
                if args and MONITOR_STOP.encode() in args[-1]:
                    break
                port = int(client_info.rsplit(b":", 1)[-1]) if b":" in client_info else 0
                self.captured.append(Captured(float(stamp), port, args, lua=client_info == b"lua"))
        client.close()

    def start(self) -> Monitor:
        self._thread.start()
        self._ready.wait(5)
        time.sleep(0.05)
        return self

    def stop(self) -> list[tuple[str, str]]:
        self.owners = port_owners(self.processes)  # read while the connections are still open
        with redis.Redis.from_url(self.url) as client:
            client.echo(MONITOR_STOP)
        self._thread.join(10)
        self.commands = [(self.owners.get(c.port, "other"), c.line) for c in self.captured]
        self.times = [c.at for c in self.captured]
        self.ports = [c.port for c in self.captured]
        return self.commands


def command_table(commands: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """{process: {COMMAND: count}} from a MONITOR capture."""
    table: dict[str, Counter[str]] = {}
    for process, line in commands:
        name = line.split(" ", 1)[0].upper()
        table.setdefault(process, Counter())[name] += 1
    return {process: dict(counts.most_common()) for process, counts in sorted(table.items())}


# --- a webhook receiver --------------------------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with _Receiver.lock:
            _Receiver.count += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class WebhookReceiver:
    """An instant 200 on a loopback port, counting deliveries."""

    def __enter__(self) -> WebhookReceiver:
        self.server = ThreadingHTTPServer((LOOPBACK, 0), _Receiver)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}/hook"

    @property
    def count(self) -> int:
        return _Receiver.count

    def wait_for(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if _Receiver.count >= count:
                return True
            time.sleep(0.02)
        return False

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- measurements on the running stack -----------------------------------------------------------------

JOB_BODY: dict[str, Any] = {
    "prompt": "a red fox in the snow, golden hour",
    "width": 512,
    "height": 512,
    "num_inference_steps": 4,
}


WAIT_S = 60  # ``Prefer: wait`` of each job (at most the stack's DARKROOM_MAX_WAIT, 60 s by default)


def _run_job(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/generations", json=body, headers={"Prefer": f"wait={WAIT_S}"})
    job = response.json()
    if response.status_code != 200 or job.get("status") != "succeeded":
        raise RuntimeError(f"job did not succeed: HTTP {response.status_code} {job}")
    final = client.get(f"/v1/generations/{job['id']}")  # the client's read of the result
    final.raise_for_status()
    return job


def idle_background(stack: Stack, seconds: float) -> dict[str, Any]:
    """Commands/bytes/CPU per second while nothing happens (workers' heartbeats and recovery loops)."""
    client = stack.redis()
    before = snapshot(client)
    time.sleep(seconds)
    after = snapshot(client)
    client.close()
    return delta(before, after, per=after.at - before.at)


def job_cost(
    stack: Stack,
    jobs: int,
    background: dict[str, Any],
    webhook_url: str | None = None,
    receiver: WebhookReceiver | None = None,
) -> dict[str, Any]:
    """Redis cost of ``jobs`` whole jobs (POST with Prefer: wait, worker, one GET), background removed."""
    client = stack.redis()
    body = dict(JOB_BODY)
    if webhook_url:
        body["webhook_url"] = webhook_url
    delivered_before = receiver.count if receiver else 0
    with stack.client(timeout=90.0) as http:
        before = snapshot(client)
        for index in range(jobs):
            _run_job(http, {**body, "seed": 7000 + index})
        if receiver is not None and not receiver.wait_for(delivered_before + jobs, timeout_s=60):
            raise RuntimeError("webhooks were not all delivered within 60 s")
        after = snapshot(client)
    client.close()
    raw = delta(before, after, per=jobs)
    return {"jobs": jobs, "raw": raw, "net": subtract(raw, background, raw["wall_s"], jobs)}


def monitor_one_job(
    stack: Stack, webhook_url: str | None = None, receiver: WebhookReceiver | None = None
) -> dict[str, Any]:
    """Every Redis command of one job, by the process that sent it (MONITOR)."""
    body = {**JOB_BODY, "seed": 4242}
    if webhook_url:
        body["webhook_url"] = webhook_url
    delivered_before = receiver.count if receiver else 0
    with stack.client(timeout=90.0) as http:
        http.get("/healthz")  # open the client connection before MONITOR starts
        monitor = Monitor(stack.redis_url, stack.cpu_roots()).start()
        started = time.perf_counter()
        job = _run_job(http, body)
        if receiver is not None:
            receiver.wait_for(delivered_before + 1, timeout_s=30)
        wall = time.perf_counter() - started
        commands = monitor.stop()
    own = [c for c in commands if c[0] != "other"]
    return {
        "job_id": job["id"],
        "wall_s": round(wall, 3),
        "commands_total": len(own),
        "by_process": command_table(own),
        "sequence": [f"{process}: {line[:160]}" for process, line in own],
    }


def monitor_idle(stack: Stack, seconds: float) -> dict[str, Any]:
    """Idle commands per second per process (MONITOR), e.g. heartbeats and lost-job recovery passes."""
    monitor = Monitor(stack.redis_url, stack.cpu_roots()).start()
    time.sleep(seconds)
    commands = [c for c in monitor.stop() if c[0] != "other"]
    table = command_table(commands)
    return {
        "seconds": seconds,
        "per_second_by_process": {
            process: {name: round(n / seconds, 3) for name, n in counts.items()}
            for process, counts in table.items()
        },
    }


def memory_per_job(stack: Stack, job_id: str) -> dict[str, Any]:
    """Bytes Redis keeps for one finished job: every key naming it, plus its share of RQ registries."""
    client = stack.redis()
    keys = sorted(k.decode() for k in client.scan_iter(match=f"*{job_id}*", count=1000))
    usage = {key: int(client.memory_usage(key, samples=0) or 0) for key in keys}
    ttl = {key: int(client.ttl(key)) for key in keys}
    registries = {}
    for key in client.scan_iter(match="rq:finished:*", count=1000):
        members = client.zcard(key)
        if members:
            registries[key.decode()] = round((client.memory_usage(key, samples=0) or 0) / members, 1)
    client.close()
    return {
        "keys": usage,
        "ttl_s": ttl,
        "registry_bytes_per_member": registries,
        "total_bytes": sum(usage.values()) + int(sum(registries.values())),
    }


# --- microbenchmarks on a scratch Redis ----------------------------------------------------------------


def recovery_pass_cost(
    redis_url: str, running: int, passes: int, sample_record: dict[bytes, bytes]
) -> dict[str, Any]:
    """Redis cost of one lost-job recovery pass with ``running`` jobs running fleet-wide, all healthy.
    Since issue #17 the pass reads only the stale end of the running set (none here), and only the lease
    holder makes it: ``bench.redis_scaling`` measures both, at two fleet sizes."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from services.jobs import RUNNING_SET, JobStore, Lifecycle, job_key, utcnow
    from services.jobs.recovery import recover_lost_jobs

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    moment = utcnow()
    now = moment.isoformat()
    with client.pipeline(transaction=False) as pipe:
        for index in range(running):
            key = job_key(f"gen_bench{index:08d}")
            record = {**sample_record, b"status": b"running", b"heartbeat_at": now.encode(), b"worker": b"w"}
            pipe.hset(key, mapping=record)  # type: ignore[arg-type]
            pipe.zadd(RUNNING_SET, {key: int(moment.timestamp() * 1000)})
        pipe.execute()
    store = JobStore(client, timedelta(days=7))
    lifecycle = Lifecycle(client, timedelta(days=7))
    queue = Queue("darkroom", connection=client, serializer=JSONSerializer)
    recover_lost_jobs(store, lifecycle, queue, lost_after=timedelta(seconds=20), max_attempts=3)  # warm up
    before = snapshot(client)
    started = time.perf_counter()
    for _ in range(passes):
        recover_lost_jobs(store, lifecycle, queue, lost_after=timedelta(hours=1), max_attempts=3)
    wall = time.perf_counter() - started
    after = snapshot(client)
    client.flushall()
    client.close()
    cost = delta(before, after, per=passes)
    cost["client_wall_ms_per_pass"] = round(wall * 1000 / passes, 2)
    cost["running"] = running
    cost["redis_cpu_us_per_running_job"] = round(cost["cpu_ms"] * 1000 / max(running, 1), 3)
    cost["bytes_out_per_running_job"] = round(cost["bytes_out"] / max(running, 1), 1)
    return cost


def lpos_cost(redis_url: str, length: int, positions: list[int], calls: int) -> dict[str, Any]:
    """Redis CPU of ``LPOS queue id`` (every GET of a queued job runs one) by position in the queue."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    key = "rq:queue:darkroom"
    chunk = 10_000
    for start in range(0, length, chunk):
        client.rpush(key, *[f"gen_{i:032x}" for i in range(start, min(start + chunk, length))])
    out = {}
    for position in positions:
        member = f"gen_{position - 1:032x}"
        before = snapshot(client)
        with client.pipeline(transaction=False) as pipe:
            for _ in range(calls):
                pipe.lpos(key, member)
            pipe.execute()
        after = snapshot(client)
        usec = after.usec.get("lpos", 0) - before.usec.get("lpos", 0)
        out[str(position)] = {
            "usec_per_call": round(usec / calls, 2),
            "cpu_us_per_call": round((after.cpu_s - before.cpu_s) * 1e6 / calls, 2),
        }
    client.flushall()
    client.close()
    per_element = [v["usec_per_call"] / int(p) for p, v in out.items() if int(p) >= 1000]
    return {
        "queue_length": length,
        "by_position": out,
        "usec_per_element_scanned": round(sum(per_element) / len(per_element), 5) if per_element else None,
    }


def sample_job_record(stack: Stack, job_id: str) -> dict[bytes, bytes]:
    client = stack.redis()
    record = client.hgetall(f"darkroom:job:{job_id}")
    client.close()
    return record  # type: ignore[return-value]


def dumps_sequence(report: dict[str, Any]) -> str:
    return json.dumps(report["by_process"], indent=2)
