"""The job store: one Redis hash per job, an event stream beside it, status changes made atomically.

The API, the GPU worker and the webhook worker all write to the same job. Status transitions therefore run
as one Lua script that checks the current status first — so "cancel a queued job" and "worker starts the
job" can race and exactly one wins — and append the change to the job's Redis stream in the same step, so
SSE readers and ``Prefer: wait`` never miss a transition and can resume from the last event id.

Keys (all expire after ``job_retention``):
- ``darkroom:job:{id}``           hash: status, timestamps, request, results (JSON values)
- ``darkroom:job:{id}:events``    stream: {type: status|progress, data: JSON}
- ``darkroom:job:{id}:webhooks``  hash: msg_id -> JSON delivery record (event, state, attempts)
- ``darkroom:jobs:running``       set of job keys whose status is running (for lost-worker recovery)

A job that belongs to a batch (``batch_id``, see ``services/batches.py``) counts itself into its batch in
the same script when it reaches a terminal status, so the transition that ends a batch's last item — and
only that one — learns it (``Transition.batch_done``), whoever made it: worker, cancel or recovery.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from redis import Redis

from schemas.jobs import JobStatus

KEY_PREFIX = "darkroom:job:"
# Jobs currently running, kept by the transition script: what lost-worker recovery scans.
RUNNING_SET = "darkroom:jobs:running"
EVENTS_MAXLEN = 2000

_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, ''} end
local allowed = false
for status in string.gmatch(ARGV[2], '[^,]+') do
  if status == current then allowed = true end
end
if not allowed then return {0, current} end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], ARGV[5]) ~= ARGV[6] then return {0, current} end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'status', 'data', ARGV[3])
if ARGV[1] == 'running' then
  redis.call('SADD', KEYS[3], KEYS[1])
else
  redis.call('SREM', KEYS[3], KEYS[1])
end
-- A batch item reaching a terminal status counts into its batch; the last one marks the batch done.
-- (The batch's key is derived here, not declared: like the whole design, this assumes one Redis.)
local ended = ''
local terminal = {succeeded = true, failed = true, canceled = true}
if terminal[ARGV[1]] and not terminal[current] then
  local batch_id = redis.call('HGET', KEYS[1], 'batch_id')
  local batch_key = batch_id and ('darkroom:batch:' .. batch_id) or ''  -- BATCH_KEY_PREFIX
  if batch_id and redis.call('EXISTS', batch_key) == 1 then
    redis.call('HINCRBY', batch_key, ARGV[1], 1)
    local done = redis.call('HINCRBY', batch_key, 'done', 1)
    if done == tonumber(redis.call('HGET', batch_key, 'total')) then
      local moment = cjson.decode(ARGV[3])['at']
      redis.call('HSET', batch_key, 'completed_at', moment)
      local retention = redis.call('HGET', batch_key, 'retention_s')
      for _, key in ipairs({batch_key, batch_key .. ':items', batch_key .. ':webhooks'}) do
        redis.call('EXPIRE', key, retention)
      end
      ended = batch_id
    end
  end
end
return {1, current, ended}
"""

#: Batch records (``services/batches.py``); spelled out in ``_TRANSITION`` too.
BATCH_KEY_PREFIX = "darkroom:batch:"


def job_key(job_id: str) -> str:
    return f"{KEY_PREFIX}{job_id}"


def events_key(job_id: str) -> str:
    return f"{KEY_PREFIX}{job_id}:events"


def webhooks_key(job_id: str) -> str:
    return f"{KEY_PREFIX}{job_id}:webhooks"


def new_job_id() -> str:
    return "gen_" + secrets.token_hex(16)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class JobRecord:
    """A job as stored: keys, not URLs. ``request`` is the normalised request without the init image."""

    id: str
    status: JobStatus
    created_at: datetime
    request: dict[str, Any]
    started_at: datetime | None = None
    completed_at: datetime | None = None
    progress: dict[str, int] | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    token_counts: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    webhook: dict[str, Any] | None = None
    init_image_key: str | None = None
    mask_image_key: str | None = None  # inpainting: the uploaded mask, beside the init image
    cancel_requested: bool = False
    worker: str | None = None
    timings: dict[str, float] | None = None
    heartbeat_at: datetime | None = None
    attempt: int = 1
    owner: str = "anonymous"  # the API key name that created the job; other keys get 404 for it
    batch_id: str | None = None  # the batch (POST /v1/batches) this job is an item of

    def creation_fields(self) -> dict[str, Any]:
        """What a new job's hash starts with (the store's ``create`` and the API's admission script)."""
        return {
            "status": self.status.value,
            "created_at": self.created_at,
            "request": self.request,
            "owner": self.owner,
            **({"webhook": self.webhook} if self.webhook else {}),
            **({"init_image_key": self.init_image_key} if self.init_image_key else {}),
            **({"mask_image_key": self.mask_image_key} if self.mask_image_key else {}),
            **({"batch_id": self.batch_id} if self.batch_id else {}),
        }

    @classmethod
    def from_hash(cls, job_id: str, raw: Mapping[bytes, bytes]) -> JobRecord:
        data = {key.decode(): value.decode() for key, value in raw.items()}

        def loads(name: str) -> Any:
            return json.loads(data[name]) if data.get(name) else None

        def when(name: str) -> datetime | None:
            return datetime.fromisoformat(data[name]) if data.get(name) else None

        return cls(
            id=job_id,
            status=JobStatus(data["status"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            request=loads("request"),
            started_at=when("started_at"),
            completed_at=when("completed_at"),
            progress=loads("progress"),
            images=loads("images") or [],
            warnings=loads("warnings") or [],
            token_counts=loads("token_counts"),
            error=loads("error"),
            webhook=loads("webhook"),
            init_image_key=data.get("init_image_key") or None,
            mask_image_key=data.get("mask_image_key") or None,
            cancel_requested=data.get("cancel_requested") == "1",
            worker=data.get("worker") or None,
            timings=loads("timings"),
            heartbeat_at=when("heartbeat_at"),
            attempt=int(data.get("attempt") or 1),
            owner=data.get("owner") or "anonymous",
            batch_id=data.get("batch_id") or None,
        )


def encode_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """Hash values: datetimes as ISO strings, strings as is, everything else as JSON."""
    encoded = {}
    for name, value in fields.items():
        if isinstance(value, datetime):
            encoded[name] = value.isoformat()
        elif isinstance(value, str):
            encoded[name] = value
        else:
            encoded[name] = json.dumps(value)
    return encoded


@dataclass(frozen=True)
class Transition:
    """Outcome of a status change attempt: whether it happened and what the status was before."""

    applied: bool
    previous: JobStatus | None
    #: The batch whose last unfinished item this transition ended (its ``batch.completed`` is due), if any.
    batch_done: str | None = None


class JobStore:
    """Reads and writes job records. Thread-safe (redis-py pools connections); no job logic lives here."""

    def __init__(self, redis: Redis, retention: timedelta) -> None:
        self.redis = redis
        self.retention_s = max(1, int(retention.total_seconds()))
        self._transition = redis.register_script(_TRANSITION)

    def create(self, record: JobRecord, extra_keys_ttl: Iterable[str] = ()) -> None:
        fields = encode_fields(record.creation_fields())
        with self.redis.pipeline() as pipe:
            pipe.hset(job_key(record.id), mapping=cast(Any, fields))
            pipe.expire(job_key(record.id), self.retention_s)
            event = json.dumps({"status": record.status.value, "at": record.created_at.isoformat()})
            pipe.xadd(events_key(record.id), {"type": "status", "data": event}, maxlen=EVENTS_MAXLEN)
            pipe.expire(events_key(record.id), self.retention_s)
            for key in extra_keys_ttl:
                pipe.expire(key, self.retention_s)
            pipe.execute()

    def running_job_ids(self) -> list[str]:
        members = cast(set[bytes], self.redis.smembers(RUNNING_SET))
        return sorted(member.decode().removeprefix(KEY_PREFIX) for member in members)

    def get(self, job_id: str) -> JobRecord | None:
        raw = cast(Mapping[bytes, bytes], self.redis.hgetall(job_key(job_id)))
        return JobRecord.from_hash(job_id, raw) if raw else None

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(job_key(job_id)))

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        allowed_from: Iterable[JobStatus],
        fields: Mapping[str, Any] | None = None,
        at: datetime | None = None,
        guard: tuple[str, str] | None = None,
    ) -> Transition:
        """Set ``to`` if the job is currently in ``allowed_from``; write ``fields`` and an event with it.

        ``guard=(field, value)`` additionally requires that stored field to hold exactly ``value``: a worker
        finishing a job it owns checks ``worker``, recovery checks the heartbeat it judged stale — so a
        worker presumed dead that wakes up cannot overwrite the re-run's result.
        """
        moment = at or utcnow()
        event = json.dumps({"status": to.value, "at": moment.isoformat()})
        guard_field, guard_value = guard or ("", "")
        args: list[str] = [to.value, ",".join(s.value for s in allowed_from), event, str(EVENTS_MAXLEN)]
        args += [guard_field, guard_value]
        for name, value in encode_fields(fields or {}).items():
            args += [name, value]
        keys = [job_key(job_id), events_key(job_id), RUNNING_SET]
        applied, previous, *rest = self._transition(keys=keys, args=args)
        previous_status = JobStatus(previous.decode()) if previous else None
        batch_done = rest[0].decode() if rest and rest[0] else None
        return Transition(applied=bool(applied), previous=previous_status, batch_done=batch_done)

    def set_progress(self, job_id: str, step: int, total: int) -> None:
        progress = json.dumps({"step": step, "total": total})
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(job_key(job_id), "progress", progress)
            pipe.xadd(events_key(job_id), {"type": "progress", "data": progress}, maxlen=EVENTS_MAXLEN)
            pipe.execute()

    def set_fields(self, job_id: str, fields: Mapping[str, Any]) -> None:
        if fields:
            self.redis.hset(job_key(job_id), mapping=cast(Any, encode_fields(fields)))

    def request_cancel(self, job_id: str) -> None:
        self.redis.hset(job_key(job_id), "cancel_requested", "1")

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(job_key(job_id), "cancel_requested") == b"1"

    def touch_terminal(self, job_id: str) -> None:
        """Restart the retention clock when a job ends, so results stay readable for the full period."""
        with self.redis.pipeline(transaction=False) as pipe:
            for key in (job_key(job_id), events_key(job_id), webhooks_key(job_id)):
                pipe.expire(key, self.retention_s)
            pipe.execute()

    # --- webhook delivery records ------------------------------------------------------------------------

    def put_delivery(self, job_id: str, msg_id: str, delivery: Mapping[str, Any]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(webhooks_key(job_id), msg_id, json.dumps(delivery, default=str))
            pipe.expire(webhooks_key(job_id), self.retention_s)
            pipe.execute()

    def get_delivery(self, job_id: str, msg_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(webhooks_key(job_id), msg_id)
        return json.loads(cast(bytes, raw)) if raw else None

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        return decode_deliveries(cast(Mapping[bytes, bytes], self.redis.hgetall(webhooks_key(job_id))))

    # --- events ------------------------------------------------------------------------------------------

    def events_since(
        self, job_id: str, last_id: str = "0-0", count: int = 500
    ) -> list[tuple[str, dict[str, Any]]]:
        entries = cast(list[Any], self.redis.xrange(events_key(job_id), min=f"({last_id}", count=count))
        return [(entry_id.decode(), decode_event(values)) for entry_id, values in entries]


def decode_deliveries(raw: Mapping[bytes, bytes]) -> list[dict[str, Any]]:
    """A job's webhook delivery records, oldest first; shared by the store and the API's async reads."""
    records = [json.loads(value) for value in raw.values()]
    return sorted(records, key=lambda record: record.get("created_at", ""))


def decode_event(values: Mapping[bytes, bytes]) -> dict[str, Any]:
    """A stream entry as {type, data}; shared by the sync store and the API's async stream reader."""
    return {"type": values[b"type"].decode(), "data": json.loads(values[b"data"])}
