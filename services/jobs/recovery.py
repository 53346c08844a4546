"""Finding jobs whose worker died mid-run and putting them back at the front of their queue.

RQ's ``SimpleWorker`` would leave such a job "started" until its registry entry expires (job timeout +
60 s) and the next maintenance pass (up to 10 minutes later) — and then *fail* it. Product backends cannot
re-create jobs, so every GPU worker runs this pass every few seconds: a running job whose heartbeat is older
than ``lost_after`` is requeued (``Lifecycle.requeue``: guarded by the very heartbeat judged stale, so a
slow-but-alive worker is never robbed twice; back at the front of the queue it came from, its dead
execution out of RQ's started registry, all in the same step), and after ``max_attempts`` lost runs it
fails as ``worker_lost`` (``Lifecycle.fail_lost``, with the ``generation.failed`` and ``batch.completed``
events any failure has) instead of crashing workers forever.

What a pass costs does not grow with the fleet (issue #17: at 1,000 workers each reading every running job
every heartbeat, recovery alone took ~6 Redis cores):

- **O(lost), not O(running)**: the running set is a sorted set scored by each job's last sign of life
  (``services.jobs.keys.RUNNING_SET``; the claim and every heartbeat move the score), so a pass reads only
  ``ZRANGEBYSCORE -inf (now - lost_after)`` — at most :data:`PASS_LIMIT` of them — and a job that beats is
  never read at all.
- **One pass per fleet**: every worker runs the loop, but only the holder of a lease
  (:class:`RecoveryLease`, ``SET NX PX``, renewed by its holder on each pass) works; the others make one
  cheap call and stop. A dead holder's lease expires and the next worker to try takes over. Two passes
  that do overlap (a lease that expired mid-pass) are still safe: each requeue is guarded.

Clocks: scores are the worker's clock (the ``heartbeat_at`` moment, in ms), not Redis ``TIME``, because
the transition that requeues is guarded by that very ``heartbeat_at`` value and the pass judges staleness on
the same clock as today; scores and guard can never disagree. The cost is the one we always had: a worker
whose clock runs more than ``lost_after`` behind the recovering worker's looks lost (NTP keeps skew to
milliseconds; ``lost_after`` is tens of seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from redis import Redis
from rq import Queue

from schemas.jobs import JobStatus
from services import rq_records
from services.jobs.keys import JOB_PREFIX, LEGACY_RUNNING_SET, RECOVERY_LEASE, RUNNING_SET, job_key
from services.jobs.lifecycle import Lifecycle, Transition
from services.jobs.records import JobRecord, beat_ms, utcnow
from services.jobs.store import JobStore

log = structlog.get_logger(__name__)

#: Stale jobs one pass reads at most; the rest wait for the next pass (a heartbeat later). Bounds how long
#: one pass holds the lease and how much it asks of Redis after a whole rack died at once.
PASS_LIMIT = 100

_PASS = """
-- KEYS: 1 the lease, 2 the running set, 3 the legacy running set (a plain SET, before scores)
-- ARGV: 1 the caller's name ('' = no lease: a direct call), 2 lease ttl ms, 3 cutoff ms (exclusive),
--       4 limit
-- Take or renew the lease; only its holder gets the stale end of the running set (and whether the legacy
-- set still exists, to migrate).
if ARGV[1] ~= '' then
  local holder = redis.call('GET', KEYS[1])
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  elseif holder then
    return {0, 0, {}}
  else
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  end
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
return {1, redis.call('EXISTS', KEYS[3]), stale}
"""

_DROP_IF_ENDED = """
-- KEYS: 1 the running set, 2 a job hash. A member whose job is not running (nor there) leaves the set; a
-- job claimed again meanwhile stays (its claim scored it afresh).
if redis.call('HGET', KEYS[2], 'status') ~= 'running' then return redis.call('ZREM', KEYS[1], KEYS[2]) end
return 0
"""

_RELEASE = """
-- KEYS: 1 the lease; ARGV: 1 the caller's name. Let go of the lease only if we hold it.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RecoveryLease:
    """Who makes the recovery passes: one worker of the fleet at a time.

    ``SET NX PX`` with the worker's (per-incarnation unique) name, renewed by each pass it makes; a holder
    that dies stops renewing and, ``ttl`` later, the next worker whose loop comes round takes over. ``ttl``
    should be a few heartbeat intervals: long enough that a live holder never loses it between two passes,
    short enough that a dead holder delays recovery by little more than that.
    """

    def __init__(self, redis: Redis, holder: str, ttl: timedelta) -> None:
        self.redis = redis
        self.holder = holder
        self.ttl_ms = max(1, int(ttl.total_seconds() * 1000))
        self._release = redis.register_script(_RELEASE)

    def release(self) -> bool:
        """Let go now (a worker stopping cleanly), so the next pass need not wait for the ttl."""
        return bool(self._release(keys=[RECOVERY_LEASE], args=[self.holder]))


def _stale_candidates(
    redis: Redis, lease: RecoveryLease | None, cutoff_ms: str, limit: int
) -> tuple[list[str], bool] | None:
    """The ids whose last sign of life is older than ``cutoff_ms`` (at most ``limit``) and whether the
    legacy running set still exists; None when another worker holds the lease."""
    script = redis.register_script(_PASS)
    holder, ttl_ms = (lease.holder, lease.ttl_ms) if lease else ("", 0)
    keys = [RECOVERY_LEASE, RUNNING_SET, LEGACY_RUNNING_SET]
    ours, legacy, members = cast(list[Any], script(keys=keys, args=[holder, ttl_ms, cutoff_ms, limit]))
    if not ours:
        return None
    return [member.decode().removeprefix(JOB_PREFIX) for member in members], bool(legacy)


def migrate_legacy_running_set(redis: Redis) -> int:
    """Move the members of the running set as it was before scores (a plain SET under
    ``LEGACY_RUNNING_SET``) into the sorted set, scored by their heartbeat; returns how many moved.

    Needed once, after an upgrade with jobs running: without it, those jobs' workers could die unnoticed.
    Each member is removed from the old set after it is scored there, so a worker still on the old code
    (a rolling upgrade) that adds one more is picked up by a later pass. O(members), but only while the
    old set exists: a pass checks that with one ``EXISTS``.
    """
    moved = 0
    for raw in cast(set[bytes], redis.smembers(LEGACY_RUNNING_SET)):
        key = raw.decode()
        status, heartbeat, started = cast(
            list[bytes | None], redis.hmget(key, ["status", "heartbeat_at", "started_at"])
        )
        last = heartbeat or started
        if status == b"running" and last:
            redis.zadd(RUNNING_SET, {key: int(beat_ms(datetime.fromisoformat(last.decode())))}, nx=True)
            moved += 1
        redis.srem(LEGACY_RUNNING_SET, key)
    if moved:
        log.info("legacy running set migrated", jobs=moved)
    return moved


@dataclass(frozen=True)
class Recovered:
    job_id: str
    action: str  # "requeued" | "failed" | "dropped"
    attempt: int


def _requeue_or_fail(
    lifecycle: Lifecycle,
    queue: Queue,
    record: JobRecord,
    *,
    guard: tuple[str, str],
    reason: str,
    max_attempts: int,
) -> Recovered | None:
    """Put a running job whose run was cut short back at the front of its queue (or fail it as
    ``worker_lost`` once it has used ``max_attempts`` runs); None if ``guard`` no longer holds."""
    redis = lifecycle.redis
    done: Transition
    if record.attempt >= max_attempts:
        message = f"{reason}; giving up after {max_attempts}"
        forget = rq_records.run_forgotten(redis, queue, record.id)
        done = lifecycle.fail_lost(record, message, guard=guard, rq=forget)
        if not done.applied:
            return None
        log.error("job failed: worker lost too often", job_id=record.id, attempts=record.attempt)
        return Recovered(record.id, "failed", record.attempt)
    done = lifecycle.requeue(record, guard=guard, rq=rq_records.requeued_at_front(redis, queue, record.id))
    if not done.applied:
        return None
    log.warning("lost job requeued", job_id=record.id, reason=reason)
    return Recovered(record.id, "requeued", record.attempt + 1)


def recover_lost_jobs(
    store: JobStore,
    lifecycle: Lifecycle,
    queue: Queue,
    *,
    lost_after: timedelta,
    max_attempts: int,
    now: datetime | None = None,
    lease: RecoveryLease | None = None,
    limit: int = PASS_LIMIT,
) -> list[Recovered]:
    """One recovery pass over the running jobs whose last sign of life is older than ``lost_after`` (at
    most ``limit`` of them); returns what it did. With a ``lease``, only while this worker holds it (taken
    or renewed here): otherwise nothing is read and nothing done. Without one (tests, tools), always."""
    moment = now or utcnow()
    redis = store.redis
    found = _stale_candidates(redis, lease, beat_ms(moment - lost_after), limit)
    if found is None:
        return []
    candidates, legacy = found
    if legacy:
        migrate_legacy_running_set(redis)
    done: list[Recovered] = []
    for job_id in candidates:
        record = store.get(job_id)
        if record is None:  # expired record: nothing to recover
            store.forget_running(job_id)
            done.append(Recovered(job_id, "dropped", 0))
            continue
        if record.status is not JobStatus.RUNNING:
            # Moved on since the read above (its transition took it out of the set), or left behind by a
            # migration that raced with its end: either way it must not take a place in every pass.
            redis.register_script(_DROP_IF_ENDED)(keys=[RUNNING_SET, job_key(job_id)])
            continue
        last_sign_of_life = record.heartbeat_at or record.started_at or record.created_at
        if moment - last_sign_of_life < lost_after:
            # It beat since its score was read, or it was scored by an older worker that beats only its
            # record (a rolling upgrade): catch the score up so the next pass does not read it again.
            redis.zadd(RUNNING_SET, {job_key(job_id): int(beat_ms(last_sign_of_life))}, xx=True, gt=True)
            continue
        guard_field = "heartbeat_at" if record.heartbeat_at else "started_at"
        guard: tuple[str, str] = (guard_field, last_sign_of_life.isoformat())
        reason = f"worker {record.worker} stopped answering during attempt {record.attempt}"
        outcome = _requeue_or_fail(
            lifecycle, queue, record, guard=guard, reason=reason, max_attempts=max_attempts
        )
        if outcome is not None:
            done.append(outcome)
    return done


def release_interrupted_job(
    store: JobStore,
    lifecycle: Lifecycle,
    queue: Queue,
    job_id: str,
    *,
    worker_name: str,
    max_attempts: int,
) -> Recovered | None:
    """After a worker's run of ``job_id`` was cut short by lost Redis connectivity, make sure the job is
    not stranded; called by that worker once Redis answers again.

    - still ``running`` under this worker's name: nobody will finish it, so requeue it now (as recovery
      would after ``lost_after``, only sooner), guarded by the worker name;
    - still ``queued`` but no longer on its queue (RQ popped it, then Redis went away before the worker
      claimed it): put it back at the front;
    - anything else (finished, or taken over by another worker) needs nothing.
    """
    record = store.get(job_id)
    if record is None:
        return None
    if record.status is JobStatus.RUNNING and record.worker == worker_name:
        reason = f"worker {worker_name} lost its Redis connection during attempt {record.attempt}"
        return _requeue_or_fail(
            lifecycle, queue, record, guard=("worker", worker_name), reason=reason, max_attempts=max_attempts
        )
    if record.status is JobStatus.QUEUED and rq_records.put_back_at_front(store.redis, queue, job_id):
        log.warning("unclaimed job put back on the queue", job_id=job_id)
        return Recovered(job_id, "requeued", record.attempt)
    return None
