"""Splits a ``MONITOR`` capture of one whole job into phases and round trips, by process.

``bench.worker_redis`` monitors one job from its submission to its archiving; this module says which of the
captured commands were that job's and where in its life each was sent:

- api: ``submit`` (rate limit, waits, admission), ``prefer_wait`` (the ``Prefer: wait`` reads: one
  ``XREAD`` per wake-up, the waits renewals, the final read), ``get`` (the client's read afterwards);
- worker: ``claim`` (from the dequeue's job read to our claim script), ``steps`` (progress writes and
  cancel checks), ``heartbeat`` (beats while the job runs), ``finish`` (our terminal script, RQ's closing
  bookkeeping, up to the next dequeue);
- webhooks: ``webhook`` (the first attempt of the ``completed`` delivery and its record, the outbox ack),
  ``archive`` (the archiver's snapshot reads and its trim);
- ``background``: what every process sends once a second or so whether or not a job runs (RQ's scheduler
  loop, the archiver's and recovery's lease, fleet presence, the outbox consumer's blocking read — the one
  that returns this job's event included, which cannot be told apart from the idle ones).

Round trips are counted from MONITOR's timing: consecutive commands of one connection less than
``PIPELINE_GAP_S`` apart (a pipeline arrives in one read) or inside MULTI..EXEC are one round trip. The
INFO ``total_reads_processed`` delta that ``bench.redis_cost`` reports is the exact total.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

PIPELINE_GAP_S = 60e-6
#: How many keys the lifecycle's transition script is called with (services.jobs.lifecycle._change).
TRANSITION_KEYS = "8"
RUNNING_SET = "darkroom:jobs:running-by-beat"

_BACKGROUND = (
    "rq:scheduler",
    "rq:scheduled:",
    "darkroom:archive:lease",
    "ZRANGEBYSCORE darkroom:archive:due",
    "recovery-lease",
    "darkroom:fleet",
    "SMEMBERS rq:queues",
    "XREADGROUP",
    "XAUTOCLAIM",
    "XINFO",
)
_BEAT = ("rq:worker:", "rq:execution", "rq:wip:", "running-by-beat", "SCRIPT LOAD")
_CONNECTION = ("PING", "HELLO", "SCRIPT EXISTS", "CLIENT ")


@dataclass
class Entry:
    process: str
    line: str
    at: float
    port: int
    phase: str = ""


def _verb(line: str) -> str:
    return line.split(" ", 1)[0].upper()


def classify(
    commands: list[tuple[str, str]], times: list[float], ports: list[int], job_id: str, post_done_at: float
) -> list[Entry]:
    """Each command of the capture with its phase (``post_done_at``: when the POST answered, Redis clock)."""
    entries = [Entry(p, line, t, port) for (p, line), t, port in zip(commands, times, ports, strict=True)]
    claims = 0
    api_waiting = False
    for index, entry in enumerate(entries):
        line, verb = entry.line, _verb(entry.line)
        if entry.process == "other":
            entry.phase = "other"
        elif any(mark in line for mark in _BACKGROUND) or any(
            line.upper().startswith(c) for c in _CONNECTION
        ):
            entry.phase = "background"
        elif entry.process == "api":
            if entry.at >= post_done_at:
                entry.phase = "get"
            elif verb == "XREAD" or api_waiting:
                api_waiting = True
                entry.phase = "prefer_wait"
            else:
                entry.phase = "submit"
        elif entry.process == "worker":
            words = line.split()
            # Our transition script (claim, then finish): its first key is the job hash, and it names the
            # running set among its 8 keys. The heartbeat script's first key is the running set itself.
            transition = verb == "EVALSHA" and len(words) > 3 and words[3] == f"darkroom:job:{job_id}"
            transition = transition and words[2] == TRANSITION_KEYS and "darkroom:jobs:running" in line
            if verb == "EVALSHA":  # the beat script's first key is the running set
                beat = len(words) > 3 and words[3] == RUNNING_SET
            else:
                beat = any(mark in line for mark in _BEAT) or ("rq:job:" in line and "last_heartbeat" in line)
            if claims == 1 and beat and not transition:
                entry.phase = "heartbeat"
            elif claims == 0:
                entry.phase = "claim"
            elif claims == 1 and not transition:
                entry.phase = "steps"
            else:
                entry.phase = "finish"
            claims += transition
        elif entry.process == "webhooks":
            entry.phase = _webhooks_phase(entries, index, job_id)
        else:
            entry.phase = "other"
    _fix_transactions(entries)
    return entries


def _webhooks_phase(entries: list[Entry], index: int, job_id: str) -> str:
    entry = entries[index]
    line, verb = entry.line, _verb(entry.line)
    if (
        "darkroom:archive:due" in line
        or verb == "XRANGE"
        or (verb == "EXPIRE" and job_id in line and " 300" in line)
    ):
        return "archive"
    if verb == "HGETALL" and job_id in line:
        # The archiver's snapshot: job hash, XRANGE of its events, deliveries hash, on one connection.
        near = [e for e in entries[max(0, index - 3) : index + 4] if e.port == entry.port and e is not entry]
        if any(_verb(e.line) == "XRANGE" for e in near):
            return "archive"
    if job_id in line or "webhook-msg" in line or verb in {"XACK", "XDEL"}:
        return "webhook"
    return "unclassified"


def _fix_transactions(entries: list[Entry]) -> None:
    """MULTI and EXEC take the phase of the commands they wrap."""
    open_at: dict[int, int] = {}
    for index, entry in enumerate(entries):
        verb = _verb(entry.line)
        if verb == "MULTI":
            open_at[entry.port] = index
        elif verb == "EXEC" and entry.port in open_at:
            start = open_at.pop(entry.port)
            inner = [e.phase for e in entries[start + 1 : index] if e.port == entry.port]
            phase = Counter(p for p in inner if p not in {"unclassified", "background"}).most_common(1)
            chosen = phase[0][0] if phase else (inner[0] if inner else entry.phase)
            for e in entries[start : index + 1]:
                if e.port == entry.port:
                    e.phase = chosen


def round_trips(entries: list[Entry]) -> list[list[Entry]]:
    """The capture grouped into round trips (see the module docstring)."""
    trips: list[list[Entry]] = []
    in_multi: set[int] = set()
    last: Entry | None = None
    for entry in entries:
        verb = _verb(entry.line)
        joins = last is not None and (
            entry.port in in_multi
            or (entry.port == last.port and entry.at - last.at < PIPELINE_GAP_S and trips)
        )
        if joins:
            trips[-1].append(entry)
        else:
            trips.append([entry])
        if verb == "MULTI":
            in_multi.add(entry.port)
        elif verb == "EXEC":
            in_multi.discard(entry.port)
        last = entry
    return trips


def breakdown(entries: list[Entry]) -> dict[str, Any]:
    """Commands and round trips per process and phase, and each phase's commands by name."""
    table: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry.phase in {"background", "other"}:
            continue
        row = table.setdefault(entry.process, {}).setdefault(
            entry.phase, {"commands": 0, "round_trips": 0, "by_command": Counter()}
        )
        row["commands"] += 1
        row["by_command"][_verb(entry.line)] += 1
    for trip in round_trips(entries):
        first = trip[0]
        if first.phase in {"background", "other"}:
            continue
        table[first.process][first.phase]["round_trips"] += 1
    out: dict[str, Any] = {}
    for process, phases in sorted(table.items()):
        out[process] = {
            phase: {**row, "by_command": dict(row["by_command"].most_common())}
            for phase, row in phases.items()
        }
        out[process]["total"] = {
            "commands": sum(r["commands"] for r in phases.values()),
            "round_trips": sum(r["round_trips"] for r in phases.values()),
        }
    out["total"] = {
        "commands": sum(p["total"]["commands"] for k, p in out.items() if k != "total"),
        "round_trips": sum(p["total"]["round_trips"] for k, p in out.items() if k != "total"),
    }
    return out
