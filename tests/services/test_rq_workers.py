"""The resilient worker between two jobs: what RQ's loop rewrote each time is written once, and what RQ's
tools read (the worker key and its state, ``rq suspend``) stays true."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib
from rq import Queue, SimpleWorker
from rq.suspension import resume, suspend
from rq.worker import WorkerStatus

from services import rq_workers
from services.clients import REDIS_UNAVAILABLE
from services.rq_workers import ResilientWorker, hold_stop_signals
from tests.fixtures.redis import RedisServerFactory

REPO_ROOT = Path(__file__).resolve().parents[2]


def noop() -> str:
    return "done"


def commands_for(worker_class: type[SimpleWorker], connection: redis_lib.Redis, jobs: int) -> int:
    """Commands Redis processed for a burst worker that runs ``jobs`` jobs (INFO's own call excluded)."""
    connection.flushall()
    queue = Queue("q", connection=connection)
    for _ in range(jobs):
        queue.enqueue(noop)
    before = int(connection.info("stats")["total_commands_processed"])
    worker = worker_class([queue], connection=connection)
    assert worker.work(burst=True)
    return int(connection.info("stats")["total_commands_processed"]) - before - 1


def test_the_worker_does_not_rewrite_its_key_and_state_between_jobs(redis_client: redis_lib.Redis) -> None:
    per_job = {
        cls: (commands_for(cls, redis_client, 6) - commands_for(cls, redis_client, 1)) / 5
        for cls in (SimpleWorker, ResilientWorker)
    }
    # RQ's loop: four heartbeats (3 commands each), two state writes and a MULTI'd suspension check per job.
    # Of those 18 commands one beat is left (the beat RQ pipelines at the start of a job lives shorter), and
    # the suspension check is one EXISTS: 12 fewer, 10 allowing for the noise of RQ's maintenance pass.
    assert per_job[ResilientWorker] <= per_job[SimpleWorker] - 10, per_job


def test_a_beat_is_sent_whenever_the_key_would_not_outlive_a_dequeue(redis_client: redis_lib.Redis) -> None:
    worker = ResilientWorker([Queue("q", connection=redis_client)], connection=redis_client)
    worker.register_birth()
    worker.heartbeat()
    assert redis_client.ttl(worker.key) >= worker.dequeue_timeout
    redis_client.expire(worker.key, 100)  # as a beat during a job leaves it (job_monitoring_interval + 60)
    worker.heartbeat()  # we did not set that ttl: skipped
    assert redis_client.ttl(worker.key) == 100
    with redis_client.pipeline() as pipeline:  # the beat RQ pipelines while a job runs
        worker.heartbeat(90, pipeline=pipeline)
        pipeline.execute()
    worker.heartbeat()  # the key would die during the next dequeue: beaten
    assert redis_client.ttl(worker.key) >= worker.dequeue_timeout
    worker.set_state(WorkerStatus.IDLE)
    redis_client.hset(worker.key, "state", "elsewhere")
    worker.set_state(WorkerStatus.IDLE)  # already written: not again
    assert redis_client.hget(worker.key, "state") == b"elsewhere"
    worker.forget_beats()  # as after a Redis outage
    worker.set_state(WorkerStatus.IDLE)
    assert redis_client.hget(worker.key, "state") == b"idle"


def test_a_side_threads_beat_keeps_the_key_alive_and_does_not_wait_for_redis(
    fresh_redis_server: RedisServerFactory,
) -> None:
    server = fresh_redis_server()
    connection = redis_lib.Redis.from_url(server.url)
    worker = ResilientWorker([Queue("q", connection=connection)], connection=connection)
    worker.register_birth()
    connection.expire(worker.key, 100)
    worker.forget_beats()  # the key lives too short for a dequeue: due
    worker.heartbeat_if_due()
    assert connection.ttl(worker.key) > worker.worker_ttl
    connection.expire(worker.key, 100)
    worker.heartbeat_if_due()  # beaten moments ago: skipped
    assert connection.ttl(worker.key) == 100
    worker.forget_beats()
    server.stop()
    started = time.monotonic()
    with pytest.raises(REDIS_UNAVAILABLE):  # one try, not a wait for Redis to come back
        worker.heartbeat_if_due()
    assert time.monotonic() - started < 10


def test_suspended_workers_still_take_no_job(redis_client: redis_lib.Redis) -> None:
    queue = Queue("q", connection=redis_client)
    job = queue.enqueue(noop)
    suspend(redis_client)
    try:
        assert not ResilientWorker([queue], connection=redis_client).work(burst=True)
        assert job.id in queue.job_ids
    finally:
        resume(redis_client)
    assert ResilientWorker([queue], connection=redis_client).work(burst=True)


def test_a_stop_signal_before_work_begins_is_a_warm_stop_not_a_kill(redis_client: redis_lib.Redis) -> None:
    """The webhook process starts attempts before RQ's loop installs its handlers: a SIGTERM meanwhile
    used to kill it mid-attempt (exit -15). Held, it ends the loop at its first check instead."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        hold_stop_signals()
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before kill() returns
        queue = Queue("q", connection=redis_client)
        queue.enqueue(noop)
        worker = ResilientWorker([queue], connection=redis_client)
        worker.work(burst=False)  # would wait for jobs forever without the held signal
        assert worker.stopped_on_request
        assert queue.count == 1  # no job was taken after the stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        rq_workers._stop_signals_before_work.clear()


FORKED_SCHEDULER = """
import os, socket, sys, time
from services.rq_workers import _release_inherited_sockets

server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname())
held, _ = server.accept()
child = os.fork()
if child == 0:  # the scheduler's side of the fork
    if sys.argv[1] == "release":
        _release_inherited_sockets()
    time.sleep(3)
    os._exit(0)
time.sleep(0.5)  # the child has let go (or not)
client.close()  # the worker's attempt ends
time.sleep(0.2)
state = held.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
os.kill(child, 9)
print("closed" if state != 1 else "still open")
"""


def test_a_forked_scheduler_keeps_none_of_the_workers_sockets_open() -> None:
    """What the worker closes after RQ forked its scheduler must close: without the release, the child's
    copy kept a webhook receiver's connection open until the scheduler died."""
    seen = {
        mode: subprocess.run(
            [sys.executable, "-c", FORKED_SCHEDULER, mode],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        for mode in ("keep", "release")
    }
    assert seen == {"keep": "still open", "release": "closed"}
