"""The one owner of a job's life: every status change, and everything that follows from it.

The API (cancel, fail a job stranded on a model nobody serves), the GPU worker (claim, progress, heartbeat,
finish), lost-job recovery (requeue, fail as lost) and anything later *ask* this module for a transition;
none of them writes a status or repeats a side effect itself. Each transition is one Lua script, so that
in one atomic step it:

- checks the job's current status (and, for a worker or recovery, a guard field: the worker's name, the
  heartbeat judged stale) — of two racing changes exactly one wins;
- writes the new status and its fields, and appends the change to the job's event stream (SSE and
  ``Prefer: wait`` readers never miss one);
- keeps the running set (a sorted set by last sign of life, so recovery reads only its stale end), the
  owner's share of its queue (``queued_in``: see ``services.admission``), a batch's count of running
  items, and RQ's records (the queue list, RQ's job hash, its started registry — built by
  ``services.rq_records``) in step with the status;
- on a terminal status, restarts the retention clock of the job's keys, marks the job (and a batch it
  completes) due for the archive (``services.jobs.archiver``), counts the job into its batch and, for the
  batch's last item, stamps the batch completed;
- appends the webhook events the change causes — the job's ``generation.*`` as its webhook subscribed,
  and ``batch.completed`` when this was the batch's last item — to the **outbox** (``darkroom:outbox``),
  which the webhook process consumes (``services.webhooks.dispatcher``).

So no path can forget an event, and no crash between "recorded" and "notified" can lose one: they are
the same write. Metrics are counted here too, once per applied change, in the process that made it.

Table of transitions (the state machine; docs/architecture.md draws it):

=============  ======================  ==================  =================================================
method         from -> to              guard               events (as subscribed)
=============  ======================  ==================  =================================================
claim          queued -> running       —                   generation.started
finish         running -> outcome      worker name         generation.succeeded|failed|canceled, batch.*
cancel_queued  queued -> canceled      —                   generation.canceled, batch.completed
requeue        running -> queued       worker / heartbeat  —
fail_lost      running -> failed       worker / heartbeat  generation.failed (worker_lost), batch.completed
fail_unserved  queued -> failed        —                   generation.failed (model_unavailable), batch.*
=============  ======================  ==================  =================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from redis import Redis
from rq import Queue

from schemas.jobs import JobErrorCode, JobStatus
from schemas.webhooks import EVENT_ALIASES
from services import metrics, rq_records
from services.jobs.batches import BatchStore
from services.jobs.keys import (
    ARCHIVE_DUE,
    BATCH_PREFIX,
    OUTBOX,
    RUNNING_SET,
    cancel_channel,
    events_key,
    job_key,
)
from services.jobs.outbox import new_msg_id
from services.jobs.outcome import Canceled, Failed, Outcome
from services.jobs.records import JobRecord, beat_ms, encode_fields, utcnow
from services.replication import NO_ACKS, NotReplicated, ReplicaAcks, run_replicated
from services.rq_records import RqChange

log = structlog.get_logger(__name__)

#: Events kept per job stream (SSE resumes within it); trimmed approximately by Redis.
EVENTS_MAXLEN = 2000

_QUEUED = (JobStatus.QUEUED,)
_RUNNING = (JobStatus.RUNNING,)


def _lua_table(aliases: Mapping[str, Iterable[str]]) -> str:
    """``{name: [event, ...]}`` as a Lua table literal (names are plain ASCII: no escaping needed)."""
    entries = ", ".join(
        f"[{json.dumps(name)}] = {{{', '.join(json.dumps(str(event)) for event in events)}}}"
        for name, events in aliases.items()
    )
    return "{" + entries + "}"


# Shared by the scripts: does a stored webhook ({url, events}) subscribe to the canonical event ``name``;
# append an event to the outbox. ``ARGV[1]`` is always the job id and ``KEYS[3]`` the outbox. Records are
# stored with canonical names (schemas.webhooks), but jobs queued before that still hold the old names:
# ``legacy`` is schemas.webhooks.EVENT_ALIASES, built from it below.
_OUTBOX_LUA = """
local legacy = LEGACY_ALIASES
local function subscribed(webhook, name)
  if not webhook then return false end
  local ok, hook = pcall(cjson.decode, webhook)
  if not ok or type(hook) ~= 'table' or type(hook['events']) ~= 'table' then return false end
  for _, event in ipairs(hook['events']) do
    if event == name then return true end
    for _, meant in ipairs(legacy[event] or {}) do
      if meant == name then return true end
    end
  end
  return false
end
local function emit(outbox, msg_id, event_type, subject, id, at)
  redis.call('XADD', outbox, '*', 'msg_id', msg_id, 'type', event_type, 'subject', subject, 'id', id,
    'at', at)
end
""".replace("LEGACY_ALIASES", _lua_table(EVENT_ALIASES))

_TRANSITION = (
    _OUTBOX_LUA
    + """
-- KEYS: 1 job hash, 2 job events, 3 outbox, 4 running set, 5 RQ queue list, 6 RQ job hash,
--       7 RQ started registry, 8 RQ's set of queues (5-8: unused unless the RQ change names them)
-- ARGV: 1 job id, 2 to, 3 allowed from (comma-separated), 4 status event JSON, 5 moment (ISO),
--       6 events maxlen, 7 guard field or '', 8 guard value, 9 retention s, 10 msg id of the job's event,
--       11 msg id of the batch's event, 12 RQ queue op ('', 'remove', 'push_front'), 13 n RQ job fields,
--       14 n stale executions, 15 reply with the record ('1' or ''), 16.. RQ job fields (name, value...),
--       stale executions, then job fields
-- Reply: {applied, status before, batch ended, events, started_at, [the job hash, flat, as left]}; with
-- ARGV[15] the hash comes with a refusal too (a claim's retry tells its own earlier claim from it).
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, ''} end
local with_record = ARGV[15] == '1'
-- The worker claims without reading the record first: a hash without created_at is no whole record
-- (services.jobs.records.JobRecord.from_stored), so no job to claim.
if with_record and redis.call('HEXISTS', KEYS[1], 'created_at') == 0 then return {0, ''} end
local function refused()
  if with_record then return {0, current, '', 0, '', redis.call('HGETALL', KEYS[1])} end
  return {0, current}
end
local allowed = false
for status in string.gmatch(ARGV[3], '[^,]+') do
  if status == current then allowed = true end
end
if not allowed then return refused() end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], ARGV[7]) ~= ARGV[8] then return refused() end

local to, moment = ARGV[2], ARGV[5]
local started_at = redis.call('HGET', KEYS[1], 'started_at') or ''  -- this run's start, for its run time
local n_rq, n_stale = tonumber(ARGV[13]), tonumber(ARGV[14])
local first_field = 16 + 2 * n_rq + n_stale
redis.call('HSET', KEYS[1], 'status', to)
for i = first_field, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'type', 'status', 'data', ARGV[4])
-- The running set (what lost-job recovery reads): a sorted set scored by each job's last sign of life, in
-- ms on the worker's clock, as its ``heartbeat_at`` (the claim passes it as the field ``beat_ms``).
if to == 'running' then
  redis.call('ZADD', KEYS[4], redis.call('HGET', KEYS[1], 'beat_ms') or 0, KEYS[1])
else
  redis.call('ZREM', KEYS[4], KEYS[1])
end
-- The owner's share of its queue (services.admission): an id leaves it with ``queued``, and comes back
-- on a requeue. Records admitted before shares existed name no set.
local queued_in = redis.call('HGET', KEYS[1], 'queued_in')
if queued_in then
  if to == 'queued' and current ~= 'queued' then
    local t = redis.call('TIME')
    redis.call('ZADD', queued_in, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
    redis.call('EXPIRE', queued_in, ARGV[9])
  elseif current == 'queued' and to ~= 'queued' then
    redis.call('ZREM', queued_in, ARGV[1])
  end
end
-- The queue's order (services.queue_order; records admitted before it name no hash): a claim advances the
-- queue's highest claimed sequence number and its claim-gap EWMA (Redis's clock, gaps capped at a minute);
-- a requeue, which puts the job at the front, gives it that number (next in line).
local order = redis.call('HGET', KEYS[1], 'queue_order')
if order and to == 'running' and current == 'queued' then
  local seq = tonumber(redis.call('HGET', KEYS[1], 'queue_seq') or '0')
  if seq > tonumber(redis.call('HGET', order, 'claimed') or '0') then
    redis.call('HSET', order, 'claimed', seq)
  end
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local last = tonumber(redis.call('HGET', order, 'claimed_at_ms') or '0')
  if last > 0 then
    local gap = math.min(math.max(now_ms - last, 0), 60000)
    local ewma = tonumber(redis.call('HGET', order, 'gap_ms') or gap)
    redis.call('HSET', order, 'gap_ms', string.format('%.1f', 0.9 * ewma + 0.1 * gap))
  end
  redis.call('HSET', order, 'claimed_at_ms', now_ms)
elseif order and to == 'queued' and current ~= 'queued' then
  redis.call('HSET', KEYS[1], 'queue_seq', redis.call('HGET', order, 'claimed') or 0)
end
-- A batch counts its running items too, so its counts are read from its hash alone (GET /v1/batches).
local item_of = redis.call('HGET', KEYS[1], 'batch_id')
if item_of and ((to == 'running') ~= (current == 'running')) then
  local counted_in = BATCH_PREFIX .. item_of
  if redis.call('EXISTS', counted_in) == 1 then
    redis.call('HINCRBY', counted_in, 'running', to == 'running' and 1 or -1)
  end
end

-- RQ's side, as services.rq_records built it. An id is on a queue at most once (admission pushes it once,
-- a requeue removes before it pushes), so a removal stops at the first match: cheap for a batch's items,
-- which sit together near the front.
if ARGV[12] == 'remove' then
  redis.call('LREM', KEYS[5], 1, ARGV[1])
elseif ARGV[12] == 'push_front' then
  redis.call('LREM', KEYS[5], 0, ARGV[1])
  redis.call('LPUSH', KEYS[5], ARGV[1])
  redis.call('SADD', KEYS[8], KEYS[5])
end
if n_rq > 0 then redis.call('HSET', KEYS[6], unpack(ARGV, 16, 15 + 2 * n_rq)) end
if n_stale > 0 then redis.call('ZREM', KEYS[7], unpack(ARGV, 16 + 2 * n_rq, 15 + 2 * n_rq + n_stale)) end

local webhook = redis.call('HGET', KEYS[1], 'webhook')
local events = 0
if to == 'running' and subscribed(webhook, 'generation.started') then
  emit(KEYS[3], ARGV[10], 'generation.started', 'job', ARGV[1], moment)
  events = events + 1
end
local ended = ''
local terminal = {succeeded = true, failed = true, canceled = true}
if terminal[to] and not terminal[current] then
  if subscribed(webhook, 'generation.' .. to) then
    emit(KEYS[3], ARGV[10], 'generation.' .. to, 'job', ARGV[1], moment)
    events = events + 1
  end
  -- What a ``Prefer: wait`` blocks on (services.jobs.keys.done_key; derived: one Redis).
  redis.call('XADD', KEYS[1] .. ':done', '*', 'status', to)
  for _, key in ipairs({KEYS[1], KEYS[2], KEYS[1] .. ':webhooks', KEYS[1] .. ':done'}) do
    redis.call('EXPIRE', key, ARGV[9])
  end
  -- To be archived to storage, then trimmed from Redis (services.jobs.archiver; key derived: one Redis).
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', ARCHIVE_DUE, 'NX', now_ms, 'job:' .. ARGV[1])
  -- A batch item counts itself into its batch; the last one ends the batch (key derived: one Redis).
  local batch_id = redis.call('HGET', KEYS[1], 'batch_id')
  local batch_key = batch_id and (BATCH_PREFIX .. batch_id) or ''
  if batch_id and redis.call('EXISTS', batch_key) == 1 then
    redis.call('HINCRBY', batch_key, to, 1)
    local done = redis.call('HINCRBY', batch_key, 'done', 1)
    if done == tonumber(redis.call('HGET', batch_key, 'total')) then
      redis.call('HSET', batch_key, 'completed_at', moment)
      local retention = redis.call('HGET', batch_key, 'retention_s')
      for _, key in ipairs({batch_key, batch_key .. ':items', batch_key .. ':webhooks'}) do
        redis.call('EXPIRE', key, retention)
      end
      ended = batch_id
      redis.call('ZADD', ARCHIVE_DUE, 'NX', now_ms, 'batch:' .. batch_id)
      if subscribed(redis.call('HGET', batch_key, 'webhook'), 'batch.completed') then
        emit(KEYS[3], ARGV[11], 'batch.completed', 'batch', batch_id, moment)
        events = events + 1
      end
    end
  end
end
local reply = {1, current, ended, events, started_at}
if with_record then reply[6] = redis.call('HGETALL', KEYS[1]) end
return reply
""".replace("BATCH_PREFIX", repr(BATCH_PREFIX)).replace("ARCHIVE_DUE", repr(ARCHIVE_DUE))
)

_PROGRESS = (
    _OUTBOX_LUA
    + """
-- KEYS: 1 job hash, 2 job events, 3 outbox
-- ARGV: 1 job id, 2 worker name, 3 progress JSON, 4 events maxlen, 5 notify ('1' or ''), 6 msg id, 7 moment
-- Only the run that holds the job writes its progress: a worker presumed dead, whose job was handed on,
-- must not overwrite the new run's progress (nor recreate an expired record).
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'progress', 'data', ARGV[3])
if ARGV[5] == '1' and subscribed(redis.call('HGET', KEYS[1], 'webhook'), 'generation.progress') then
  emit(KEYS[3], ARGV[6], 'generation.progress', 'job', ARGV[1], ARGV[7])
end
return 1
"""
)

_BEAT = """
-- KEYS: 1 the running set, 2.. job hashes; ARGV: 1 worker name, 2 moment (ISO), 3 the same moment in ms.
-- Beats only the jobs still running under this worker: their heartbeat and their running-set score.
local beaten = 0
for i = 2, #KEYS do
  local key = KEYS[i]
  if redis.call('HGET', key, 'status') == 'running' and redis.call('HGET', key, 'worker') == ARGV[1] then
    redis.call('HSET', key, 'heartbeat_at', ARGV[2], 'beat_ms', ARGV[3])
    redis.call('ZADD', KEYS[1], 'XX', ARGV[3], key)
    beaten = beaten + 1
  end
end
return beaten
"""

_REQUEST_CANCEL = """
-- KEYS: 1 job hash. A job that has not ended is marked; returns the status it had ('' if none).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status == 'queued' or status == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return status
"""


def _record(job_id: str, flat: list[bytes]) -> JobRecord | None:
    """The record in a script's ``HGETALL`` reply (names and values, flat); None if it is no record."""
    return JobRecord.from_stored(job_id, dict(zip(flat[::2], flat[1::2], strict=True)))


@dataclass(frozen=True)
class Transition:
    """Outcome of a status change attempt: whether it happened and what the status was before."""

    applied: bool
    previous: JobStatus | None
    #: The batch whose last unfinished item this transition ended, if any (its completion is recorded).
    batch_done: str | None = None
    #: Webhook events this change appended to the outbox.
    events: int = 0
    #: When the run this change ended had started (as stored), for its run time.
    started_at: datetime | None = None
    #: The job as the change left it (or, refused, as it found it): read back by a claim only, in the same
    #: script, so the worker needs no read of its own before it claims. None for other transitions, and
    #: for a hash that is no readable record.
    record: JobRecord | None = None


class Lifecycle:
    """Makes the transitions. Thread-safe (redis-py pools connections); one per process is enough."""

    def __init__(self, redis: Redis, retention: timedelta, *, acks: ReplicaAcks = NO_ACKS) -> None:
        """``acks``: replicas that must hold a job's end before it counts as made (services.replication)."""
        self.redis = redis
        self.retention_s = max(1, int(retention.total_seconds()))
        self.acks = acks
        self._transition = redis.register_script(_TRANSITION)
        self._progress = redis.register_script(_PROGRESS)
        self._beat = redis.register_script(_BEAT)
        self._request_cancel = redis.register_script(_REQUEST_CANCEL)

    # --- the worker --------------------------------------------------------------------------------------

    def claim(
        self, job: JobRecord | str, worker: str, *, at: datetime | None = None, rq: RqChange | None = None
    ) -> Transition:
        """QUEUED -> RUNNING under ``worker``'s name: of all who try, one wins. ``job``: its id (a record
        counts by its id alone). ``rq``: RQ's side when the worker did not dequeue the job itself
        (``rq_records.taken_by``).

        The claim reads the record back in the same script (``Transition.record``, as the claim left it:
        what the worker runs, its ``cancel_requested`` flag included), so a worker asks Redis once per
        claim rather than reading the job first: a round trip per job (issue #17). A hash without a whole
        record (no ``created_at``) is no job, as for every reader: ``previous`` None, nothing changed.

        Safe to repeat with the same ``at``: if an earlier try applied but its reply was lost with the
        connection, the job holds exactly this claim (our name, our ``started_at``) and that counts as
        applied. ``heartbeat_at`` restarts with the claim (and with it the job's score in the running
        set, ``beat_ms``), so a previous run's stale beat cannot get this run requeued.
        """
        job_id = job if isinstance(job, str) else job.id
        moment = at or utcnow()
        fields = {"started_at": moment, "heartbeat_at": moment, "beat_ms": beat_ms(moment), "worker": worker}
        done = self._change(job_id, JobStatus.RUNNING, _QUEUED, fields, moment, rq=rq, with_record=True)
        done = self._repeated(done, job_id, JobStatus.RUNNING, worker, "started_at", moment, _QUEUED)
        if done.applied and done.record is not None:
            metrics.QUEUE_WAIT.observe(max(0.0, (moment - done.record.created_at).total_seconds()))
        return done

    def progress(self, job_id: str, worker: str, step: int, total: int, *, notify: bool = False) -> bool:
        """Record step ``step`` of ``total`` (and, ``notify``, a ``generation.progress`` event if the
        webhook subscribed); only while the job runs under ``worker``. True if written."""
        data = json.dumps({"step": step, "total": total})
        moment = utcnow().isoformat()
        args: list[str | int] = [
            job_id,
            worker,
            data,
            EVENTS_MAXLEN,
            "1" if notify else "",
            new_msg_id(),
            moment,
        ]
        keys = [job_key(job_id), events_key(job_id), OUTBOX]
        return bool(self._progress(keys=keys, args=args))

    def beat(self, job_ids: Iterable[str], worker: str) -> int:
        """Heartbeat each job still running under ``worker``, in one round trip; how many were. Each
        beat also moves the job's score in the running set, so recovery never reads a job that beats."""
        keys = [job_key(job_id) for job_id in sorted(set(job_ids))]
        if not keys:
            return 0
        moment = utcnow()
        return int(self._beat(keys=[RUNNING_SET, *keys], args=[worker, moment.isoformat(), beat_ms(moment)]))

    def finish(
        self, record: JobRecord, worker: str, outcome: Outcome, *, at: datetime | None = None
    ) -> Transition:
        """RUNNING -> the outcome's status, only while the job is still ``worker``'s: a worker presumed
        dead that wakes up cannot overwrite the re-run's result. Safe to repeat with the same ``at``."""
        moment = at or utcnow()
        done = self._end(record.id, outcome, moment, _RUNNING, guard=("worker", worker), repeat_of=worker)
        if done.applied:
            run_s = (moment - done.started_at).total_seconds() if done.started_at else 0.0
            metrics.RUN_TIME.labels(outcome.status.value).observe(max(0.0, run_s))
        return done

    # --- the API -----------------------------------------------------------------------------------------

    def cancel_queued(self, job_id: str, message: str, *, rq: RqChange | None = None) -> Transition:
        """QUEUED -> CANCELED at once; ``rq``: take it off its queue in the same step
        (``rq_records.remove_from_queue``)."""
        return self._end(job_id, Canceled(message), utcnow(), _QUEUED, rq=rq)

    def request_cancel(self, job_id: str) -> JobStatus | None:
        """Ask a running job to stop at its next denoising step (its worker then finishes it
        ``canceled``; it hears of it on its cancel channel, ``worker.cancel_watch``). Returns the status
        it had: None if there is no such job; a terminal one if it had ended (nothing is marked then)."""
        status = cast(bytes, self._request_cancel(keys=[job_key(job_id)], args=[]))
        if status == b"running":  # its worker hears it at once, without asking Redis at every step
            worker = cast(bytes | None, self.redis.hget(job_key(job_id), "worker"))
            if worker:
                self.redis.publish(cancel_channel(worker.decode()), job_id)
        return JobStatus(status.decode()) if status else None

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(job_key(job_id), "cancel_requested") == b"1"

    def cancel(self, job_id: str, message: str, *, rq: RqChange) -> JobStatus | None:
        """``DELETE``-style cancel: a queued job ends ``canceled`` now (off its queue: ``rq``), a running
        one is asked to stop at its next step. Returns the status the job had (None: no such job; a
        terminal status: it had already ended and nothing changed)."""
        done = self.cancel_queued(job_id, message, rq=rq)
        if done.applied:
            return JobStatus.QUEUED
        if done.previous is None or done.previous.is_terminal:
            return done.previous
        return self.request_cancel(job_id)  # running (or claimed a moment ago): stops at its next step

    def cancel_batch(self, batch_id: str, queue: Queue) -> list[str] | None:
        """Cancel every item of a batch that has not ended: queued ones ``canceled`` now (each off
        ``queue``, the batch queue), running ones asked to stop. Each item's transition counts into the
        batch, so the one that ends its last item — here, or in the worker that stops the last running
        item — records the batch's completion and its ``batch.completed``. Returns the items canceled
        while queued; None if the batch had already ended (or does not exist): nothing changed then."""
        batches = BatchStore(self.redis)
        if not batches.request_cancel(batch_id):
            return None
        canceled: list[str] = []
        rq = rq_records.remove_from_queue(queue)
        for job_id in batches.item_ids(batch_id):
            if self.cancel(job_id, "batch canceled while this item was queued", rq=rq) is JobStatus.QUEUED:
                canceled.append(job_id)
        log.info("batch canceled", batch_id=batch_id, canceled_queued=len(canceled))
        return canceled

    # --- lost-job recovery -------------------------------------------------------------------------------

    def requeue(self, record: JobRecord, *, guard: tuple[str, str], rq: RqChange) -> Transition:
        """RUNNING -> QUEUED for another attempt, back at the front of its queue (``rq``:
        ``rq_records.requeued_at_front``) — only while ``guard`` (the worker's name, or the heartbeat
        recovery judged stale) still holds, so a slow-but-alive worker is never robbed twice."""
        fields = {"attempt": record.attempt + 1, "worker": "", "progress": ""}
        return self._change(record.id, JobStatus.QUEUED, _RUNNING, fields, utcnow(), guard=guard, rq=rq)

    def fail_lost(
        self, record: JobRecord, message: str, *, guard: tuple[str, str], rq: RqChange | None = None
    ) -> Transition:
        """RUNNING -> FAILED ``worker_lost``: its worker died on its last allowed attempt. The same
        events as any failure (``generation.failed``, a batch's ``batch.completed``)."""
        outcome = Failed(JobErrorCode.WORKER_LOST, message)
        return self._end(record.id, outcome, utcnow(), _RUNNING, guard=guard, rq=rq)

    # --- stranded jobs (services/jobs/unserved.py) ----------------------------------------------------------

    def fail_unserved(self, job_id: str, message: str, *, rq: RqChange | None = None) -> Transition:
        """QUEUED -> FAILED ``model_unavailable``: no worker serves the job's model (nor will: see
        ``services.jobs.unserved``); ``rq``: off its queue in the same step
        (``rq_records.remove_from_queue``). The same events as any failure (``generation.failed``, a
        batch's ``batch.completed``). A job claimed meanwhile is left alone: it is served after all."""
        return self._end(job_id, Failed(JobErrorCode.MODEL_UNAVAILABLE, message), utcnow(), _QUEUED, rq=rq)

    # --- the one script ----------------------------------------------------------------------------------

    def _end(
        self,
        job_id: str,
        outcome: Outcome,
        moment: datetime,
        allowed_from: tuple[JobStatus, ...],
        *,
        guard: tuple[str, str] | None = None,
        rq: RqChange | None = None,
        repeat_of: str | None = None,
    ) -> Transition:
        """A terminal transition to ``outcome`` at ``moment``, counted once in the outcomes metric.
        ``repeat_of``: a worker's name whose earlier try of exactly this change counts as made."""
        fields = {**outcome.record_fields(), "completed_at": moment}
        done = self._change(job_id, outcome.status, allowed_from, fields, moment, guard=guard, rq=rq)
        if repeat_of is not None:
            done = self._repeated(
                done, job_id, outcome.status, repeat_of, "completed_at", moment, allowed_from
            )
        if done.applied:
            metrics.JOBS.labels(outcome.status.value).inc()
        return done

    def _change(
        self,
        job_id: str,
        to: JobStatus,
        allowed_from: tuple[JobStatus, ...],
        fields: Mapping[str, Any],
        moment: datetime,
        *,
        guard: tuple[str, str] | None = None,
        rq: RqChange | None = None,
        with_record: bool = False,
    ) -> Transition:
        """``with_record``: the script replies with the job hash too (``Transition.record``)."""
        rq = rq or RqChange()
        event = json.dumps({"status": to.value, "at": moment.isoformat()})
        guard_field, guard_value = guard or ("", "")
        filler = job_key(job_id)  # a declared key the script leaves alone when the RQ change names none
        keys = [
            job_key(job_id),
            events_key(job_id),
            OUTBOX,
            RUNNING_SET,
            rq.queue_key or filler,
            rq.job_key or filler,
            rq.registry_key or filler,
            rq.queues_set or filler,
        ]
        args: list[str | int] = [
            job_id,
            to.value,
            ",".join(status.value for status in allowed_from),
            event,
            moment.isoformat(),
            EVENTS_MAXLEN,
            guard_field,
            guard_value,
            self.retention_s,
            new_msg_id(),
            new_msg_id(),
            rq.queue_op,
            len(rq.job_fields),
            len(rq.stale_executions),
            "1" if with_record else "",
        ]
        for name, value in rq.job_fields.items():
            args += [name, value]
        args += rq.stale_executions
        for name, value in encode_fields({**fields}).items():
            args += [name, value]
        applied, previous, *rest = self._run_transition(to, keys, args)
        transition = Transition(
            applied=bool(applied),
            previous=JobStatus(previous.decode()) if previous else None,
            batch_done=rest[0].decode() if rest and rest[0] else None,
            events=int(rest[1]) if len(rest) > 1 else 0,
            started_at=datetime.fromisoformat(rest[2].decode()) if len(rest) > 2 and rest[2] else None,
            record=_record(job_id, rest[3]) if len(rest) > 3 else None,
        )
        if transition.applied:
            log.debug("job transition", job_id=job_id, to=to.value, previous=transition.previous)
        return transition

    def _run_transition(self, to: JobStatus, keys: list[str], args: list[str | int]) -> Any:
        """The transition script; a job's end also waits for ``self.acks`` replicas. Not acknowledged in
        time (no replica, or one far behind): the end is on the primary only — logged, and reported made
        all the same. Should that primary be lost before its replica catches up, the job is found running
        with a stale heartbeat on the new one and lost-job recovery runs it again: it still ends once."""
        if not to.is_terminal or self.acks.replicas == 0:
            return self._transition(keys=keys, args=args)
        try:
            return run_replicated(self._transition, keys, args, self.redis, self.acks)
        except NotReplicated as exc:
            log.warning("job end not acknowledged by a replica", job_id=args[0], to=to.value, error=str(exc))
            metrics.REPLICA_ACK_TIMEOUTS.labels("job_end").inc()
            return exc.result

    def _repeated(
        self,
        done: Transition,
        job_id: str,
        to: JobStatus,
        worker: str,
        stamp: str,
        moment: datetime,
        allowed_from: tuple[JobStatus, ...],
    ) -> Transition:
        """``done``, or "applied" when it was refused only because an earlier try of exactly this change
        (our worker name, our ``stamp`` time) had already applied. A refusal that came with the record (a
        claim's) is judged from it; otherwise the fields are read."""
        if done.applied or done.previous is not to:
            return done
        if done.record is not None:
            stamped: datetime | None = getattr(done.record, stamp)  # started_at / completed_at
            worker_now, stamp_now = done.record.worker, stamped.isoformat() if stamped else None
            started = done.record.started_at
        else:
            raw = cast(list[bytes | None], self.redis.hmget(job_key(job_id), ["worker", stamp, "started_at"]))
            worker_now, stamp_now, started_at = (value.decode() if value else None for value in raw)
            started = datetime.fromisoformat(started_at) if started_at else None
        if worker_now == worker and stamp_now == moment.isoformat():
            return Transition(applied=True, previous=allowed_from[0], started_at=started, record=done.record)
        return done
