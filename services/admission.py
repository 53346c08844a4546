"""Admitting a submission: one Redis script decides and records it, so nothing is half-done.

A submission used to be four separate steps — claim the Idempotency-Key, take a rate-limit token, compare
the queue depth with its ceiling, write the job record, then let RQ write its job and push it. Between
those steps concurrent submissions could overshoot the ceiling, a refused request could burn its
Idempotency-Key (a retry then pointed at a job that never existed), and a Redis outage between "record
written" and "enqueued" left a ``queued`` job on no queue. It also cost five round trips.

Now one Lua script does all of it atomically, in this order:

1. an ``Idempotency-Key`` already used → the existing job's entry (nothing else happens);
2. the queue at its ceiling → refused, no token spent, nothing written;
3. the key holding its share of the ceiling → refused, no token spent, nothing written;
4. the key's token bucket empty → refused, nothing written (the API takes a submission's token before
   validating it, ``services.rate_limit.TokenGate``, and passes no bucket here; direct callers may);
5. otherwise: the job hash and its first event, RQ's job hash, the queue push and the Idempotency-Key,
   together — the answer carries the job's place in the queue (the length after the push).

RQ's job hash is built by RQ itself (``Queue.create_job`` → ``Job.to_dict``), so workers dequeue exactly
what ``Queue.enqueue`` would have written; the script only stores it. All keys live on one Redis (no
cluster slots to respect), as the whole design assumes.

Between the ceiling and the token, both scripts check the API key's **share** of the ceiling
(``DARKROOM_QUEUE_SHARE_PER_KEY``): a key holding its share of a queue gets ``share_exceeded`` (429
``queue_share_exceeded``) while other keys still get in. Its queued ids are a sorted set per key and
queue (``services.jobs.keys.queued_of_key``) that the lifecycle keeps in step with every status change.

Batches (``POST /v1/batches``) have their own script, :class:`BatchAdmitter`: the same checks, then the
batch record and every item — job hash, first event, RQ job, push onto the batch queue — or nothing. A
batch spends tokens from its own bucket in proportion to what it stores (:func:`batch_cost`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, cast

import redis.asyncio as aredis
from rq import Queue

from schemas.jobs import JobStatus
from services.jobs.batches import BatchRecord
from services.jobs.keys import (
    JOB_PREFIX,
    batch_key,
    events_key,
    items_key,
    job_key,
    owner_batches_key,
    queued_of_key,
)
from services.jobs.lifecycle import EVENTS_MAXLEN
from services.jobs.records import JobRecord, encode_fields
from services.rate_limit import TAKE_TOKEN_LUA, RateLimit
from services.rq_records import generation_job_fields, job_hash_key, job_hash_prefix, queues_set_key
from services.settings import Settings

# Shared by both scripts: a key's share of a queue's ceiling. ``queued_in`` is a sorted set per key and
# queue of the ids it has waiting there (score: admission time, ms); the lifecycle's transition script
# removes an id when its job leaves ``queued`` and adds it back on a requeue (``services.jobs.lifecycle``),
# the job hash naming the set (``queued_in``). Self-healing: entries older than the retention go, and a key
# found at its share first drops the oldest entries whose job is no longer queued.
_SHARE_LUA = """
local function share_held(key, retention_s, now_ms)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms - 1000 * retention_s)
  return redis.call('ZCARD', key)
end
local function share_pruned(key)
  for _, id in ipairs(redis.call('ZRANGE', key, 0, 63)) do
    if redis.call('HGET', JOB_PREFIX .. id, 'status') ~= 'queued' then redis.call('ZREM', key, id) end
  end
  return redis.call('ZCARD', key)
end
local function share_check(key, share, n, retention_s, now_ms)
  local held = share_held(key, retention_s, now_ms)
  if held + n > share then held = share_pruned(key) end
  return held + n <= share, held
end
local function now_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
""".replace("JOB_PREFIX", repr(JOB_PREFIX))

_ADMIT = (
    TAKE_TOKEN_LUA
    + _SHARE_LUA
    + """
-- KEYS: 1 job hash, 2 job events, 3 RQ job hash, 4 RQ queue list, 5 RQ's set of queues,
--       6 Idempotency-Key (unused when ARGV[4] == ''), 7 rate bucket (unused when ARGV[2] == ''),
--       8 the key's queued ids on this queue (its share)
-- ARGV: 1 queue ceiling, 2 bucket capacity or '', 3 tokens per ms, 4 Idempotency-Key value or '',
--       5 its ttl s, 6 the key's share of the ceiling, 7 job retention s, 8 events maxlen, 9 first event,
--       10 job id, 11 n job fields, 12.. job fields (name, value...), then RQ job fields (name, value...)
if ARGV[4] ~= '' then
  local existing = redis.call('GET', KEYS[6])
  if existing then return {'replay', existing} end
end
local depth = redis.call('LLEN', KEYS[4])
if depth >= tonumber(ARGV[1]) then return {'queue_full', depth} end
local now = now_ms()
local fits, held = share_check(KEYS[8], tonumber(ARGV[6]), 1, tonumber(ARGV[7]), now)
if not fits then return {'share_exceeded', held} end
if ARGV[2] ~= '' then
  local allowed, wait_ms = take_token(KEYS[7], tonumber(ARGV[2]), tonumber(ARGV[3]))
  if allowed == 0 then return {'rate_limited', wait_ms} end
end
local n = tonumber(ARGV[11])
redis.call('HSET', KEYS[1], unpack(ARGV, 12, 11 + n))
redis.call('HSET', KEYS[1], 'queued_in', KEYS[8])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'type', 'status', 'data', ARGV[9])
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('HSET', KEYS[3], unpack(ARGV, 12 + n, #ARGV))
redis.call('SADD', KEYS[5], KEYS[4])
local position = redis.call('RPUSH', KEYS[4], ARGV[10])
redis.call('ZADD', KEYS[8], now, ARGV[10])
redis.call('EXPIRE', KEYS[8], ARGV[7])
if ARGV[4] ~= '' then redis.call('SET', KEYS[6], ARGV[4], 'EX', ARGV[5]) end
return {'queued', position}
"""
)

Outcome = Literal["queued", "replay", "queue_full", "share_exceeded", "rate_limited"]


@dataclass(frozen=True)
class Admission:
    """What the script decided. ``value``: queue position (queued), queue depth (queue_full), the key's
    queued jobs there (share_exceeded), milliseconds until a token (rate_limited); ``existing``: the
    stored Idempotency-Key entry (replay)."""

    outcome: Outcome
    value: int = 0
    existing: dict[str, Any] | None = None


@dataclass(frozen=True)
class IdempotencyClaim:
    """Reserve ``key`` (already hashed and namespaced) for what is being created — ``created`` is
    ``{"job_id": ...}`` or ``{"batch_id": ...}`` — remembering the body's digest."""

    key: str
    created: dict[str, str]
    fingerprint: str
    ttl: timedelta

    def stored_value(self) -> str:
        return json.dumps({**self.created, "fingerprint": self.fingerprint})


class Admitter:
    """Runs the admission script on the API's async Redis client: no thread hop, one round trip."""

    def __init__(
        self,
        redis: aredis.Redis,
        queue: Queue,
        settings: Settings,
        rate_limit: RateLimit | None,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.rate_limit = rate_limit
        self.retention_s = max(1, int(settings.job_retention.total_seconds()))
        self._script = redis.register_script(_ADMIT)

    async def admit(
        self, record: JobRecord, principal: str, idempotency: IdempotencyClaim | None = None
    ) -> Admission:
        """Record and enqueue ``record`` unless a replay, the ceiling or the rate limit says otherwise."""
        job_fields = _flatten(encode_fields(record.creation_fields()))
        rq_fields = _flatten(generation_job_fields(self.queue, record.id, self.settings))
        event = json.dumps({"status": record.status.value, "at": record.created_at.isoformat()})
        rate = self.rate_limit
        keys = [
            job_key(record.id),
            events_key(record.id),
            job_hash_key(record.id),
            self.queue.key,
            queues_set_key(self.queue),
            idempotency.key if idempotency else job_key(record.id),
            rate.bucket_key(principal) if rate else job_key(record.id),
            queued_of_key(principal, self.queue.key),
        ]
        ceiling = self.settings.max_queue_depth
        args: list[str | bytes | int] = [
            *_check_args(ceiling, rate, idempotency),
            key_share(ceiling, self.settings.queue_share_per_key),
            self.retention_s,
            EVENTS_MAXLEN,
            event,
            record.id,
            len(job_fields),
            *job_fields,
            *rq_fields,
        ]
        return _admission(*await self._script(keys=keys, args=args))


def _check_args(
    ceiling: int, rate: RateLimit | None, idempotency: IdempotencyClaim | None
) -> list[str | bytes | int]:
    """ARGV 1..5 of both scripts, for their shared checks: the queue ceiling, the rate bucket (capacity,
    tokens per ms; '' when off), the Idempotency-Key entry to store and its ttl ('' / 0 without a key)."""
    return [
        ceiling,
        rate.capacity if rate else "",
        repr(rate.per_ms) if rate else "",
        idempotency.stored_value() if idempotency else "",
        max(1, int(idempotency.ttl.total_seconds())) if idempotency else 0,
    ]


def key_share(ceiling: int, fraction: float) -> int:
    """How many of a queue's ``ceiling`` places one API key may hold (at least one)."""
    return max(1, int(ceiling * fraction))


def _admission(raw_outcome: bytes | str, value: Any) -> Admission:
    """What a script answered: ``{outcome, value}``, the value an Idempotency-Key entry for a replay."""
    outcome = cast(Outcome, raw_outcome.decode() if isinstance(raw_outcome, bytes) else raw_outcome)
    if outcome == "replay":
        return Admission("replay", existing=json.loads(value))
    return Admission(outcome, value=int(value))


def _flatten(fields: dict[str, Any]) -> list[str | bytes]:
    flat: list[str | bytes] = []
    for name, value in fields.items():
        flat.append(name)
        flat.append(value if isinstance(value, str | bytes) else str(value))
    return flat


# --- batches (POST /v1/batches) ----------------------------------------------------------------------------

_ADMIT_BATCH = (
    TAKE_TOKEN_LUA
    + _SHARE_LUA
    + """
-- KEYS: 1 batch hash, 2 batch items list, 3 RQ batch queue list, 4 RQ's set of queues,
--       5 Idempotency-Key (unused when ARGV[4] == ''), 6 batch-token bucket (unused when ARGV[2] == ''),
--       7 the owner's batches (sorted set of batch hash keys by creation time, for GET /v1/batches),
--       8 the owner's queued ids on the batch queue (its share)
-- ARGV: 1 queue ceiling, 2 bucket capacity or '', 3 tokens per ms, 4 Idempotency-Key value or '',
--       5 its ttl s, 6 the key's share of the ceiling, 7 retention s, 8 events maxlen, 9 first event,
--       10 n items, 11 job key prefix, 12 RQ job key prefix, 13 tokens this batch costs, 14 n batch fields,
--       15.. batch fields (name, value...), then per item:
--       job id, n job fields, job fields..., n RQ job fields, RQ job fields...
-- Item keys are derived from the prefixes (a thousand items would be 3,000 KEYS): one Redis, as ever.
if ARGV[4] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {'replay', existing} end
end
local depth = redis.call('LLEN', KEYS[3])
local n = tonumber(ARGV[10])
if depth + n > tonumber(ARGV[1]) then return {'queue_full', depth} end
local now = now_ms()
local fits, held = share_check(KEYS[8], tonumber(ARGV[6]), n, tonumber(ARGV[7]), now)
if not fits then return {'share_exceeded', held} end
if ARGV[2] ~= '' then
  local allowed, wait_ms = take_token(KEYS[6], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[13]))
  if allowed == 0 then return {'rate_limited', wait_ms} end
end
local nb = tonumber(ARGV[14])
redis.call('HSET', KEYS[1], unpack(ARGV, 15, 14 + nb))
redis.call('EXPIRE', KEYS[1], ARGV[7])
-- The owner's index outlives any one batch (a batch's retention restarts when it completes): entries
-- older than twice the retention go, and readers drop entries whose batch has expired.
redis.call('ZADD', KEYS[7], now, KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - 2000 * tonumber(ARGV[7]))
redis.call('EXPIRE', KEYS[7], 2 * tonumber(ARGV[7]))
redis.call('SADD', KEYS[4], KEYS[3])
local i = 15 + nb
local position = depth
for _ = 1, n do
  local id = ARGV[i]
  local job = ARGV[11] .. id
  local nj = tonumber(ARGV[i + 1])
  redis.call('HSET', job, unpack(ARGV, i + 2, i + 1 + nj))
  redis.call('HSET', job, 'queued_in', KEYS[8])
  redis.call('EXPIRE', job, ARGV[7])
  redis.call('XADD', job .. ':events', 'MAXLEN', '~', ARGV[8], '*', 'type', 'status', 'data', ARGV[9])
  redis.call('EXPIRE', job .. ':events', ARGV[7])
  i = i + 2 + nj
  local nr = tonumber(ARGV[i])
  redis.call('HSET', ARGV[12] .. id, unpack(ARGV, i + 1, i + nr))
  i = i + 1 + nr
  redis.call('RPUSH', KEYS[2], id)
  redis.call('ZADD', KEYS[8], now, id)
  position = redis.call('RPUSH', KEYS[3], id)
end
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('EXPIRE', KEYS[8], ARGV[7])
if ARGV[4] ~= '' then redis.call('SET', KEYS[5], ARGV[4], 'EX', ARGV[5]) end
return {'queued', position}
"""
)


class BatchAdmitter:
    """Admits a batch and every one of its items, or nothing, in one script on the batch queue.

    Same order of checks as :class:`Admitter`: an ``Idempotency-Key`` replay; the batch queue's ceiling
    (``max_batch_queue_depth``), which must hold the queued items *plus all of this batch's*; the key's
    share of that ceiling (``queue_share_per_key``), likewise; then ``cost`` tokens from the key's
    batch bucket (``rate_limit`` here is the batch-token bucket, ``DARKROOM_BATCH_ITEMS_*``): a batch
    costs in proportion to what it stores (:func:`batch_cost`). ``value`` of a ``queued`` admission: the
    batch queue's length after the push.
    """

    def __init__(
        self, redis: aredis.Redis, queue: Queue, settings: Settings, rate_limit: RateLimit | None
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.rate_limit = rate_limit
        self._script = redis.register_script(_ADMIT_BATCH)

    async def admit(
        self,
        batch: BatchRecord,
        items: list[JobRecord],
        principal: str,
        idempotency: IdempotencyClaim | None = None,
        cost: int | None = None,
    ) -> Admission:
        """``cost``: tokens the batch spends (default: one per item)."""
        batch_fields = _flatten(batch.creation_fields())
        rate = self.rate_limit
        keys = [
            batch_key(batch.id),
            items_key(batch.id),
            self.queue.key,
            queues_set_key(self.queue),
            idempotency.key if idempotency else batch_key(batch.id),
            rate.bucket_key(principal) if rate else batch_key(batch.id),
            owner_batches_key(batch.owner),
            queued_of_key(principal, self.queue.key),
        ]
        event = json.dumps({"status": JobStatus.QUEUED.value, "at": batch.created_at.isoformat()})
        ceiling = self.settings.max_batch_queue_depth
        args: list[str | bytes | int] = [
            *_check_args(ceiling, rate, idempotency),
            key_share(ceiling, self.settings.queue_share_per_key),
            batch.retention_s,
            EVENTS_MAXLEN,
            event,
            len(items),
            JOB_PREFIX,
            job_hash_prefix(),
            len(items) if cost is None else cost,
            len(batch_fields),
            *batch_fields,
        ]
        # ~0.1 ms of Python per item (RQ builds its job hash): a large batch does it off the event loop.
        if len(items) > 32:
            args += await asyncio.to_thread(self._item_args, items)
        else:
            args += self._item_args(items)
        return _admission(*await self._script(keys=keys, args=args))

    def _item_args(self, items: list[JobRecord]) -> list[str | bytes | int]:
        args: list[str | bytes | int] = []
        for record in items:
            job_fields = _flatten(encode_fields(record.creation_fields()))
            rq_fields = _flatten(generation_job_fields(self.queue, record.id, self.settings))
            args += [record.id, len(job_fields), *job_fields, len(rq_fields), *rq_fields]
        return args


def batch_cost(items: int, stored_request_bytes: int, token_bytes: int) -> int:
    """Tokens a batch spends: one per item, plus one per ``token_bytes`` of request its items store (a
    thousand copies of a 40 KB prompt cost ten times what a thousand short prompts do)."""
    return items + stored_request_bytes // token_bytes
