"""Lost-job recovery at fleet scale: one pass per fleet (the lease), and a pass that reads only lost jobs."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import cast

import redis as redis_lib
from rq import Queue
from rq.serializers import JSONSerializer

from schemas.jobs import JobStatus
from services.jobs import JobStore, Lifecycle, job_key, utcnow
from services.jobs.keys import LEGACY_RUNNING_SET, RECOVERY_LEASE, RUNNING_SET
from services.jobs.recovery import Recovered, RecoveryLease, recover_lost_jobs
from tests.fixtures.jobs import queued_job
from tests.fixtures.redis import RedisServerFactory

LOST_AFTER = timedelta(seconds=20)


class Fleet:
    """A real Redis with one RQ queue, and the store and lifecycle every worker's recovery uses."""

    def __init__(self, redis_url: str) -> None:
        self.redis = redis_lib.Redis.from_url(redis_url)
        self.store = JobStore(self.redis, timedelta(days=1))
        self.lifecycle = Lifecycle(self.redis, timedelta(days=1))
        self.queue = Queue("darkroom", connection=self.redis, serializer=JSONSerializer)

    def recover(self, lease: RecoveryLease | None = None) -> list[Recovered]:
        return recover_lost_jobs(
            self.store, self.lifecycle, self.queue, lost_after=LOST_AFTER, max_attempts=3, lease=lease
        )

    def running_job(self, *, silent_for: float) -> str:
        """A job claimed ``silent_for`` seconds ago by a worker that has not beaten since."""
        record = queued_job(self.redis, queue=self.queue, created_at=utcnow() - timedelta(seconds=silent_for))
        self.redis.lrem(self.queue.key, 0, record.id)  # RQ's dequeue
        claimed = self.lifecycle.claim(record, "darkroom-w-1", at=utcnow() - timedelta(seconds=silent_for))
        assert claimed.applied
        return record.id

    def status(self, job_id: str) -> JobStatus:
        record = self.store.get(job_id)
        assert record is not None
        return record.status


def hgetall_calls(redis: redis_lib.Redis) -> int:
    """How many HGETALL the server has answered (``INFO commandstats``): a job record read is one."""
    stats = cast(dict[str, dict[str, int]], redis.info("commandstats"))
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


def test_only_the_lease_holder_makes_the_pass(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    first, second = (RecoveryLease(fleet.redis, name, timedelta(seconds=30)) for name in ("w-1", "w-2"))
    assert fleet.recover(first) == []  # nothing lost yet; w-1 now holds the lease
    assert fleet.redis.get(RECOVERY_LEASE) == b"w-1"
    lost = fleet.running_job(silent_for=60)
    assert fleet.recover(second) == []  # not the holder: reads nothing, does nothing
    assert fleet.status(lost) is JobStatus.RUNNING
    [done] = fleet.recover(first)
    assert (done.job_id, done.action) == (lost, "requeued")
    assert fleet.redis.pttl(RECOVERY_LEASE) > 25_000  # renewed by its holder's pass


def test_a_dead_holders_lease_expires_and_another_worker_takes_over(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    dead = RecoveryLease(fleet.redis, "w-dead", timedelta(milliseconds=300))
    alive = RecoveryLease(fleet.redis, "w-alive", timedelta(seconds=30))
    assert fleet.recover(dead) == []  # w-dead holds the lease, then dies: it never renews it
    lost = fleet.running_job(silent_for=60)
    assert fleet.recover(alive) == []
    deadline = time.monotonic() + 10
    while fleet.redis.exists(RECOVERY_LEASE):  # the lease's own expiry is the event awaited
        assert time.monotonic() < deadline, "the dead holder's lease never expired"
        time.sleep(0.05)
    [done] = fleet.recover(alive)
    assert (done.job_id, done.action) == (lost, "requeued")
    assert fleet.redis.get(RECOVERY_LEASE) == b"w-alive"


def test_a_stopping_holder_gives_the_lease_back_and_only_its_own(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    holder = RecoveryLease(fleet.redis, "w-1", timedelta(seconds=30))
    other = RecoveryLease(fleet.redis, "w-2", timedelta(seconds=30))
    fleet.recover(holder)
    assert not other.release()
    assert fleet.redis.get(RECOVERY_LEASE) == b"w-1"
    assert holder.release()
    assert not fleet.redis.exists(RECOVERY_LEASE)


def test_a_pass_reads_only_the_lost_jobs_never_those_that_beat(
    fresh_redis_server: RedisServerFactory,
) -> None:
    """O(lost): 40 jobs beating, 1 lost; the pass reads one record (one HGETALL), whatever the fleet."""
    server = fresh_redis_server(appendonly=False)  # its own server: nobody else's commands are counted
    fleet = Fleet(server.url)
    beating = [fleet.running_job(silent_for=60) for _ in range(40)]
    assert fleet.lifecycle.beat(beating, "darkroom-w-1") == 40  # they were only slow to beat
    lost = fleet.running_job(silent_for=60)
    before = hgetall_calls(fleet.redis)
    [done] = fleet.recover()
    assert hgetall_calls(fleet.redis) - before == 1
    assert done.job_id == lost
    before = hgetall_calls(fleet.redis)
    assert fleet.recover() == []
    assert hgetall_calls(fleet.redis) - before == 0  # nothing lost: not one record read
    assert all(fleet.status(job_id) is JobStatus.RUNNING for job_id in beating)


def test_a_pass_reads_at_most_its_limit(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    lost = [fleet.running_job(silent_for=60) for _ in range(5)]
    first = recover_lost_jobs(
        fleet.store, fleet.lifecycle, fleet.queue, lost_after=LOST_AFTER, max_attempts=3, limit=2
    )
    assert len(first) == 2
    rest = fleet.recover()
    assert sorted(done.job_id for done in first + rest) == sorted(lost)


def test_a_lost_job_is_requeued_exactly_once_when_two_workers_race(redis_url: str) -> None:
    """Two passes at once (no lease, or one that expired mid-pass): the guarded requeue lets one win."""
    fleet = Fleet(redis_url)
    lost = [fleet.running_job(silent_for=60) for _ in range(8)]
    start = threading.Barrier(2)
    results: list[list[Recovered]] = []

    def race() -> None:
        worker = Fleet(redis_url)  # its own connections, as another worker process has
        start.wait()
        results.append(worker.recover())

    threads = [threading.Thread(target=race) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    requeued = sorted(done.job_id for result in results for done in result if done.action == "requeued")
    assert requeued == sorted(lost)  # each once, by one of the two
    waiting = [raw.decode() for raw in cast(list[bytes], fleet.redis.lrange(fleet.queue.key, 0, -1))]
    assert sorted(waiting) == sorted(lost)  # each on the queue once
    for job_id in lost:
        record = fleet.store.get(job_id)
        assert record is not None and record.status is JobStatus.QUEUED and record.attempt == 2


def test_the_running_set_is_scored_by_the_last_sign_of_life(redis_url: str) -> None:
    fleet = Fleet(redis_url)
    job_id = fleet.running_job(silent_for=60)
    claimed_score = fleet.redis.zscore(RUNNING_SET, job_key(job_id))
    assert claimed_score is not None and claimed_score < (time.time() - 50) * 1000
    assert fleet.lifecycle.beat([job_id], "darkroom-w-1") == 1
    beaten = fleet.redis.zscore(RUNNING_SET, job_key(job_id))
    assert beaten is not None and abs(beaten - time.time() * 1000) < 5_000
    assert fleet.lifecycle.beat([job_id], "darkroom-someone-else") == 0  # not its worker: score kept
    assert fleet.redis.zscore(RUNNING_SET, job_key(job_id)) == beaten


def test_jobs_in_the_running_set_of_before_the_upgrade_are_migrated_and_recovered(redis_url: str) -> None:
    """The old layout: a plain SET under the old name. Its members move into the sorted set (scored by
    their heartbeat) on the first pass, the lost one is recovered, the live one left alone."""
    fleet = Fleet(redis_url)
    lost, alive = fleet.running_job(silent_for=60), fleet.running_job(silent_for=2)
    fleet.redis.delete(RUNNING_SET)  # as an older version left them: in the plain set only
    fleet.redis.sadd(LEGACY_RUNNING_SET, job_key(lost), job_key(alive))
    fleet.recover()  # the first pass finds the old set and migrates it (this pass read no candidate yet)
    assert not fleet.redis.exists(LEGACY_RUNNING_SET)
    assert fleet.redis.zscore(RUNNING_SET, job_key(alive)) is not None
    [done] = fleet.recover()
    assert (done.job_id, done.action) == (lost, "requeued")
    assert fleet.status(alive) is JobStatus.RUNNING


def test_a_member_whose_job_is_no_longer_running_leaves_the_set(redis_url: str) -> None:
    """A stray member (a migration that raced with the job's end) would take a place in every pass."""
    fleet = Fleet(redis_url)
    job_id = fleet.running_job(silent_for=60)
    fleet.redis.hset(job_key(job_id), "status", "succeeded")  # ended without its transition: a stray
    assert fleet.recover() == []
    assert fleet.redis.zscore(RUNNING_SET, job_key(job_id)) is None
