"""``Prefer: wait``'s blocking read (``api.generations.events.wait_until_finished``) on a real Redis, with
the real lifecycle writing the job's progress and outcome: it returns once, at the end, however many
progress events the run writes — and at once for a job that has already ended."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta

import redis as redis_lib
import redis.asyncio as aredis

from api.generations.events import wait_until_finished
from services.jobs import Lifecycle
from services.jobs.keys import done_key
from services.jobs.outcome import Succeeded
from tests.fixtures.jobs import queued_job

WORKER = "worker-events"


def _xreads(client: redis_lib.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


def _wait(url: str, job_id: str, timeout_s: float) -> tuple[bool, float]:
    async def wait() -> tuple[bool, float]:
        client = aredis.Redis.from_url(url)
        started = time.monotonic()
        try:
            return await wait_until_finished(client, job_id, timeout_s), time.monotonic() - started
        finally:
            await client.aclose()

    return asyncio.run(wait())


def test_a_wait_reads_once_however_many_progress_events_the_run_writes(
    redis_url: str, redis_client: redis_lib.Redis
) -> None:
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    record = queued_job(redis_client)
    assert lifecycle.claim(record, WORKER).applied
    before = _xreads(redis_client)
    outcome: dict[str, tuple[bool, float]] = {}
    waiter = threading.Thread(target=lambda: outcome.update(w=_wait(redis_url, record.id, 10.0)))
    waiter.start()
    time.sleep(0.2)  # the wait is blocked in Redis now
    for step in range(1, 21):
        assert lifecycle.progress(record.id, WORKER, step, 20)
        time.sleep(0.01)
    assert lifecycle.finish(record, WORKER, Succeeded(images=[])).applied
    waiter.join(5)
    finished, waited_s = outcome["w"]
    assert finished and waited_s < 5
    # Its event stream took 22 entries (started, 20 progress, succeeded); a read of it woke on each.
    assert _xreads(redis_client) - before == 1


def test_a_wait_on_a_job_that_has_ended_returns_at_once(
    redis_url: str, redis_client: redis_lib.Redis
) -> None:
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    record = queued_job(redis_client)
    assert lifecycle.cancel_queued(record.id, "not needed").applied
    assert 0 < redis_client.ttl(done_key(record.id)) <= 86_400  # kept as long as the job's other keys
    finished, waited_s = _wait(redis_url, record.id, 10.0)
    assert finished and waited_s < 1
    second, _ = _wait(redis_url, record.id, 10.0)  # every waiter sees it: the read takes nothing away
    assert second


def test_a_wait_on_a_running_job_times_out(redis_url: str, redis_client: redis_lib.Redis) -> None:
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    record = queued_job(redis_client)
    assert lifecycle.claim(record, WORKER).applied
    assert lifecycle.progress(record.id, WORKER, 1, 20)
    finished, waited_s = _wait(redis_url, record.id, 0.5)
    assert not finished and 0.4 < waited_s < 3
