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
batch record and every item — job hash, first event, RQ job, push onto the batch queue — or nothing. The
items' records are written first, in chunks, under staging keys nothing reads; the script only renames
them into place, so the largest batch allowed holds Redis ~10 ms instead of ~100 ms. A batch spends
tokens from its own bucket in proportion to what it stores (:func:`batch_cost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, cast

import redis.asyncio as aredis
from redis import exceptions as redis_exceptions
from redis.commands.core import AsyncScript
from rq import Queue

from schemas.jobs import JobStatus
from services import metrics
from services.jobs.batches import BatchRecord
from services.jobs.keys import (
    JOB_PREFIX,
    batch_key,
    events_key,
    items_key,
    job_key,
    owner_batches_key,
    queue_order_key,
    queued_of_key,
    staging_prefix,
)
from services.jobs.lifecycle import EVENTS_MAXLEN
from services.jobs.records import JobRecord, encode_fields
from services.rate_limit import TAKE_TOKEN_LUA, RateLimit
from services.replication import (
    NotReplicated,
    ReplicaAcks,
    ScriptArgs,
    ScriptKeys,
    run_replicated_async,
    wait_for_replicas_async,
)
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
--       8 the key's queued ids on this queue (its share), 9 the queue's order counters (services.queue_order)
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
-- Its place in the queue's order: the next enqueue sequence number (services.queue_order).
redis.call('HSET', KEYS[1], 'queue_seq', redis.call('HINCRBY', KEYS[9], 'pushed', 1), 'queue_order', KEYS[9])
return {'queued', position, redis.call('HGET', KEYS[9], 'gap_ms') or ''}
"""
)

Outcome = Literal["queued", "replay", "queue_full", "share_exceeded", "rate_limited"]


@dataclass(frozen=True)
class Admission:
    """What the script decided. ``value``: queue position (queued), queue depth (queue_full), the key's
    queued jobs there (share_exceeded), milliseconds until a token (rate_limited); ``existing``: the
    stored Idempotency-Key entry (replay); ``gap_ms``: the queue's recent time between claims
    (``services.queue_order``; queued, when known)."""

    outcome: Outcome
    value: int = 0
    existing: dict[str, Any] | None = None
    gap_ms: float | None = None


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
        self._redis = redis
        self._acks = ReplicaAcks.from_settings(settings)
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
            queue_order_key(self.queue.key),
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
        return _admission(*await _replicated(self._script, keys, args, self._redis, self._acks))


async def _replicated(
    script: AsyncScript, keys: ScriptKeys, args: ScriptArgs, redis: aredis.Redis, acks: ReplicaAcks
) -> Any:
    """An admission script's answer, once ``acks`` replicas hold what it wrote (``services.replication``).

    An admission no replica acknowledged in time raises ``NotReplicated`` (503 ``redis_unavailable``):
    the job is on the primary, so the client's retry with the same Idempotency-Key gets it back, while
    without a key a retry may admit a second job. A refusal wrote nothing: it is answered. A replay wrote
    nothing either, but the job it returns may be the one whose acknowledgement timed out: it too waits
    until a replica holds everything written before it."""
    try:
        answer = await run_replicated_async(script, keys, args, redis, acks)
    except NotReplicated as exc:
        answer = exc.result
        if answer[0] in (b"queued", "queued"):
            metrics.REPLICA_ACK_TIMEOUTS.labels("admission").inc()
            raise
    if answer[0] in (b"replay", "replay"):
        try:
            await wait_for_replicas_async(redis, acks)
        except NotReplicated:
            metrics.REPLICA_ACK_TIMEOUTS.labels("admission").inc()
            raise
    return answer


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


def _admission(raw_outcome: bytes | str, value: Any, gap_ms: Any = b"") -> Admission:
    """What a script answered: ``{outcome, value}``, the value an Idempotency-Key entry for a replay;
    a ``queued`` answer may add the queue's claim gap (ms, '' when not known yet)."""
    outcome = cast(Outcome, raw_outcome.decode() if isinstance(raw_outcome, bytes) else raw_outcome)
    if outcome == "replay":
        return Admission("replay", existing=json.loads(value))
    return Admission(outcome, value=int(value), gap_ms=float(gap_ms) if gap_ms else None)


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
--       8 the owner's queued ids on the batch queue (its share), 9 the queue's order counters
-- ARGV: 1 queue ceiling, 2 bucket capacity or '', 3 tokens per ms, 4 Idempotency-Key value or '',
--       5 its ttl s, 6 the key's share of the ceiling, 7 retention s, 8 n items, 9 job key prefix,
--       10 RQ job key prefix, 11 staging prefix, 12 tokens this batch costs, 13 n batch fields,
--       14.. batch fields (name, value...), then the item ids
-- Each item's job hash, first event and RQ job hash were written before this script, under staging keys
-- (``staging prefix .. id`` and its ':events' / ':rq'): here they are only checked, renamed into place
-- (O(1) each, whatever a request weighs) and queued. Item keys are derived from the prefixes (a thousand
-- items would be 3,000 KEYS): one Redis, as ever.
if ARGV[4] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {'replay', existing} end
end
local depth = redis.call('LLEN', KEYS[3])
local n = tonumber(ARGV[8])
if depth + n > tonumber(ARGV[1]) then return {'queue_full', depth} end
local now = now_ms()
local fits, held = share_check(KEYS[8], tonumber(ARGV[6]), n, tonumber(ARGV[7]), now)
if not fits then return {'share_exceeded', held} end
local nb = tonumber(ARGV[13])
local first = 14 + nb
-- Every staged key still there (they expire if admission comes too late), or nothing is admitted.
local staged = 0
for i = first, #ARGV, 100 do
  local keys = {}
  for j = i, math.min(i + 99, #ARGV) do
    local key = ARGV[11] .. ARGV[j]
    keys[#keys + 1] = key
    keys[#keys + 1] = key .. ':events'
    keys[#keys + 1] = key .. ':rq'
  end
  staged = staged + redis.call('EXISTS', unpack(keys))
end
if staged ~= 3 * n then return {'staging_lost', 3 * n - staged} end
if ARGV[2] ~= '' then
  local allowed, wait_ms = take_token(KEYS[6], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[12]))
  if allowed == 0 then return {'rate_limited', wait_ms} end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 14, 13 + nb))
redis.call('EXPIRE', KEYS[1], ARGV[7])
-- The owner's index outlives any one batch (a batch's retention restarts when it completes): entries
-- older than twice the retention go, and readers drop entries whose batch has expired.
redis.call('ZADD', KEYS[7], now, KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - 2000 * tonumber(ARGV[7]))
redis.call('EXPIRE', KEYS[7], 2 * tonumber(ARGV[7]))
redis.call('SADD', KEYS[4], KEYS[3])
-- The items' places in the queue's order: the next n enqueue sequence numbers (services.queue_order).
local seq = redis.call('HINCRBY', KEYS[9], 'pushed', n) - n
for j = first, #ARGV do
  local id = ARGV[j]
  local staging, job, rq_job = ARGV[11] .. id, ARGV[9] .. id, ARGV[10] .. id
  redis.call('RENAME', staging, job)
  seq = seq + 1
  redis.call('HSET', job, 'queue_seq', seq, 'queue_order', KEYS[9])
  redis.call('EXPIRE', job, ARGV[7])
  redis.call('RENAME', staging .. ':events', job .. ':events')
  redis.call('EXPIRE', job .. ':events', ARGV[7])
  redis.call('RENAME', staging .. ':rq', rq_job)
  redis.call('PERSIST', rq_job)  -- RQ's job hash has no TTL until RQ gives it one, as Queue.enqueue
end
local position = depth
for i = first, #ARGV, 1000 do
  local last = math.min(i + 999, #ARGV)
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, last))
  position = redis.call('RPUSH', KEYS[3], unpack(ARGV, i, last))
  local scored = {}
  for j = i, last do
    scored[#scored + 1] = now
    scored[#scored + 1] = ARGV[j]
  end
  redis.call('ZADD', KEYS[8], unpack(scored))
end
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('EXPIRE', KEYS[8], ARGV[7])
if ARGV[4] ~= '' then redis.call('SET', KEYS[5], ARGV[4], 'EX', ARGV[5]) end
return {'queued', position}
"""
)

#: How long a batch's staged items may wait for the admission script before Redis drops them (a refused
#: or failed admission deletes them at once; this is the backstop for an API process that died).
STAGING_TTL_S = 300
#: Items staged per pipeline round trip (~8 KB each at most: ~0.5 MB per round trip).
STAGE_CHUNK = 64


class StagingLost(redis_exceptions.TimeoutError):
    """Some of a batch's staged items expired before the admission script ran: nothing was admitted (the
    API answers 503, as for any Redis that does not answer in time)."""


class BatchAdmitter:
    """Admits a batch and every one of its items, or nothing, on the batch queue.

    In two steps, so that no single step holds Redis for long (a thousand 8 KB items written by one
    script blocked every other client for ~100 ms): the items' records are first written under staging
    keys that nothing reads, in pipelined chunks that other clients interleave with (:data:`STAGE_CHUNK`),
    expiring after :data:`STAGING_TTL_S`; then one script decides and, if admitted, renames them into
    place and queues them — all of them or none, as clients see it. A refused admission deletes what it
    staged.

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
        self._redis = redis
        self._acks = ReplicaAcks.from_settings(settings)
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
        share_key = queued_of_key(principal, self.queue.key)
        keys = [
            batch_key(batch.id),
            items_key(batch.id),
            self.queue.key,
            queues_set_key(self.queue),
            idempotency.key if idempotency else batch_key(batch.id),
            rate.bucket_key(principal) if rate else batch_key(batch.id),
            owner_batches_key(batch.owner),
            share_key,
            queue_order_key(self.queue.key),
        ]
        ceiling = self.settings.max_batch_queue_depth
        prefix = staging_prefix(batch.id)
        ids = [item.id for item in items]
        args: list[str | bytes | int] = [
            *_check_args(ceiling, rate, idempotency),
            key_share(ceiling, self.settings.queue_share_per_key),
            batch.retention_s,
            len(items),
            JOB_PREFIX,
            job_hash_prefix(),
            prefix,
            len(items) if cost is None else cost,
            len(batch_fields),
            *batch_fields,
            *ids,
        ]
        # A replay stages nothing (the script answers it before looking at the staged items).
        replay = idempotency is not None and bool(await self._redis.exists(idempotency.key))
        try:
            if not replay:
                await self._stage(prefix, batch, items, share_key)
            outcome, value = await _replicated(self._script, keys, args, self._redis, self._acks)
        except BaseException:
            await self._unstage(prefix, ids)
            raise
        if outcome in (b"queued", "queued"):
            return _admission(outcome, value)
        if not replay:
            await self._unstage(prefix, ids)
        if outcome in (b"staging_lost", "staging_lost"):
            raise StagingLost(f"batch {batch.id}: {value} staged records expired before its admission")
        return _admission(outcome, value)

    async def _stage(self, prefix: str, batch: BatchRecord, items: list[JobRecord], share_key: str) -> None:
        """Each item's job hash, first event and RQ job hash under its staging keys, expiring; one round
        trip per :data:`STAGE_CHUNK` items."""
        event = json.dumps({"status": JobStatus.QUEUED.value, "at": batch.created_at.isoformat()})
        for start in range(0, len(items), STAGE_CHUNK):
            chunk = items[start : start + STAGE_CHUNK]
            # ~0.1 ms of Python per item (RQ builds its job hash): a large batch does it off the event loop.
            fields = (
                await asyncio.to_thread(self._item_fields, chunk)
                if len(items) > 32
                else (self._item_fields(chunk))
            )
            async with self._redis.pipeline(transaction=False) as pipe:
                for record, (job_fields, rq_fields) in zip(chunk, fields, strict=True):
                    key = prefix + record.id
                    pipe.execute_command("HSET", key, *job_fields, "queued_in", share_key)
                    pipe.expire(key, STAGING_TTL_S)
                    pipe.xadd(
                        key + ":events",
                        {"type": "status", "data": event},
                        maxlen=EVENTS_MAXLEN,
                        approximate=True,
                    )
                    pipe.expire(key + ":events", STAGING_TTL_S)
                    pipe.execute_command("HSET", key + ":rq", *rq_fields)
                    pipe.expire(key + ":rq", STAGING_TTL_S)
                await pipe.execute()

    async def _unstage(self, prefix: str, ids: list[str]) -> None:
        """Delete what was staged for a batch that was not admitted (best effort: the keys expire anyway)."""
        keys = [prefix + job_id + suffix for job_id in ids for suffix in ("", ":events", ":rq")]
        with contextlib.suppress(redis_exceptions.RedisError):
            for start in range(0, len(keys), 3 * STAGE_CHUNK):
                await self._redis.unlink(*keys[start : start + 3 * STAGE_CHUNK])

    def _item_fields(self, items: list[JobRecord]) -> list[tuple[list[str | bytes], list[str | bytes]]]:
        return [
            (
                _flatten(encode_fields(record.creation_fields())),
                _flatten(generation_job_fields(self.queue, record.id, self.settings)),
            )
            for record in items
        ]


def batch_cost(items: int, stored_request_bytes: int, token_bytes: int) -> int:
    """Tokens a batch spends: one per item, plus one per ``token_bytes`` of request its items store (a
    thousand copies of a 40 KB prompt cost ten times what a thousand short prompts do)."""
    return items + stored_request_bytes // token_bytes
