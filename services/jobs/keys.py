"""Where a job's and a batch's state lives in Redis: every key the jobs package reads or writes.

One module, so the layout can be read in one place (docs/architecture.md has the whole picture) and the
Lua scripts, which must derive some keys themselves, spell them from the same prefixes.

Per job (all expire after ``job_retention``, restarted when the job ends; cut to minutes once archived):
- ``darkroom:job:{id}``           hash: status, timestamps, request, outcome fields (JSON values)
- ``darkroom:job:{id}:events``    stream: {type: status|progress, data: JSON} for SSE and ``Prefer: wait``
- ``darkroom:job:{id}:webhooks``  hash: msg_id -> JSON delivery record (event, state, attempts)

Per batch (``POST /v1/batches``; expire after the retention too, restarted when the batch completes):
- ``darkroom:batch:{id}``           hash: owner, created_at, total, done, per-status counts, webhook, ...
- ``darkroom:batch:{id}:items``     list: item job ids in submission order
- ``darkroom:batch:{id}:webhooks``  hash: msg_id -> JSON delivery record of ``batch.completed``
- ``darkroom:batches-of:{owner}``   sorted set: an API key's batch hash keys by creation time (ms)

Per API key and queue:
- ``darkroom:queued-of:{owner}:{queue key}``  sorted set: the key's job ids waiting on that queue, by
  admission time (ms): its share of the queue's ceiling (``DARKROOM_QUEUE_SHARE_PER_KEY``)

While a batch is being admitted (``services.admission.BatchAdmitter``; expire after a few minutes):
- ``darkroom:staging:{batch id}:{job id}``  an item's job hash, its ``:events`` and its ``:rq`` (RQ's job
  hash), written before the admission script, which renames them into place or leaves them to be deleted

Once finished (``services.jobs.archiver``): a job's or batch's keys above stay only
``DARKROOM_FINISHED_TTL`` (minutes) after its record is archived to storage as one JSON object
(``services.jobs.archive``: ``records/jobs/{id}.json``, ``records/batches/{id}.json``); reads fall through
to it within ``DARKROOM_JOB_RETENTION``. A batch hash gets ``archived_at`` when its archive is written.

Shared:
- ``darkroom:jobs:running-by-beat``  sorted set of the job hash keys whose status is running, scored by
                             each job's last sign of life (ms since the epoch, the worker's clock: claim and
                             every heartbeat move it). Lost-job recovery reads only the stale end
                             (``ZRANGEBYSCORE -inf (now - lost_after)``), never the jobs that beat.
                             (Until this layout it was a plain set under ``darkroom:jobs:running``; recovery
                             moves any members left there into the sorted set, then deletes them.)
- ``darkroom:jobs:recovery-lease``  string, the name of the worker whose recovery loop makes the passes
                             (``SET NX PX``, renewed by its holder each pass; expires when the holder dies)
- ``darkroom:queue-order:{queue key}``  hash per RQ queue: ``pushed`` (the last enqueue sequence number
                             given), ``claimed`` (the highest sequence number claimed), ``claimed_at_ms`` and
                             ``gap_ms`` (an EWMA of the time between claims, Redis's clock): a queued job's
                             ``queue_seq`` minus ``claimed`` is its place in line, in O(1)
- ``darkroom:archive:due``   sorted set: ``job:{id}`` / ``batch:{id}`` to archive, by due time (ms); the
                             terminal transition adds them, the archiver takes, postpones or removes them
- ``darkroom:archive:lease`` string: the token of the one archiver working now (expires unless renewed)
- ``darkroom:outbox``        stream: the webhook events status changes caused, consumed by the webhook
                             process as the consumer group ``darkroom:outbox:dispatch`` (see ``outbox``)

Pub/sub (no key): ``darkroom:cancel:{worker}``, the ids of that worker's running jobs asked to stop.
"""

from __future__ import annotations

import re

JOB_PREFIX = "darkroom:job:"
BATCH_PREFIX = "darkroom:batch:"
RUNNING_SET = "darkroom:jobs:running-by-beat"
#: The running set before it was scored (a plain SET): a new name, so an old one can never answer WRONGTYPE.
LEGACY_RUNNING_SET = "darkroom:jobs:running"
RECOVERY_LEASE = "darkroom:jobs:recovery-lease"
QUEUE_ORDER_PREFIX = "darkroom:queue-order:"
OUTBOX = "darkroom:outbox"
OUTBOX_GROUP = "darkroom:outbox:dispatch"
ARCHIVE_DUE = "darkroom:archive:due"
ARCHIVE_LEASE = "darkroom:archive:lease"
_OWNER_BATCHES_PREFIX = "darkroom:batches-of:"
_QUEUED_OF_PREFIX = "darkroom:queued-of:"
_STAGING_PREFIX = "darkroom:staging:"


# The ids we mint (``records.new_job_id``, ``batches.new_batch_id``). An id from a URL is checked against its
# own format before any key is built from it: ``gen_x:events`` would otherwise name another key (of another
# type), which answers WRONGTYPE (a 500) where a made-up id answers 404 — an existence oracle.
JOB_ID_PATTERN = r"gen_[0-9a-f]{32}"
BATCH_ID_PATTERN = r"batch_[0-9a-f]{32}"
_JOB_ID = re.compile(JOB_ID_PATTERN)
_BATCH_ID = re.compile(BATCH_ID_PATTERN)


def is_job_id(value: str) -> bool:
    """Whether ``value`` has the form of a job id (``gen_`` + 32 lowercase hex digits)."""
    return _JOB_ID.fullmatch(value) is not None


def is_batch_id(value: str) -> bool:
    """Whether ``value`` has the form of a batch id (``batch_`` + 32 lowercase hex digits)."""
    return _BATCH_ID.fullmatch(value) is not None


def job_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}"


def events_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}:events"


def webhooks_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}:webhooks"


def done_key(job_id: str) -> str:
    """A stream with one entry, the job's terminal status, once it has one (the terminal transition adds
    it, with the job's other keys' expiry): ``Prefer: wait`` blocks reading it — woken once, where a
    blocking read of the event stream woke for every progress event."""
    return f"{JOB_PREFIX}{job_id}:done"


def batch_key(batch_id: str) -> str:
    return f"{BATCH_PREFIX}{batch_id}"


def items_key(batch_id: str) -> str:
    return f"{BATCH_PREFIX}{batch_id}:items"


def batch_webhooks_key(batch_id: str) -> str:
    return f"{BATCH_PREFIX}{batch_id}:webhooks"


def owner_batches_key(owner: str) -> str:
    """Sorted set of an API key's batches (their hash keys by creation time), for ``GET /v1/batches``."""
    return f"{_OWNER_BATCHES_PREFIX}{owner}"


def queued_of_key(owner: str, queue_key: str) -> str:
    """Sorted set of the job ids an API key has waiting on one queue (score: admission time, ms): its share
    of that queue's ceiling. Admission adds, the lifecycle removes (the job hash names it: ``queued_in``)."""
    return f"{_QUEUED_OF_PREFIX}{owner}:{queue_key}"


def staging_prefix(batch_id: str) -> str:
    """What a batch's staged item keys start with: ``prefix .. job id`` (the job hash), ``.. ':events'``,
    ``.. ':rq'``. Nothing reads them but the batch admission script."""
    return f"{_STAGING_PREFIX}{batch_id}:"


def queue_order_key(queue_key: str) -> str:
    """Hash of one RQ queue's order counters (enqueue sequence, highest claimed, claim rate): a queued
    job's place in line in O(1). Admission and the lifecycle write it; the job hash names it
    (``queue_order``)."""
    return f"{QUEUE_ORDER_PREFIX}{queue_key}"


def cancel_channel(worker: str) -> str:
    """Pub/sub channel of one worker: the ids of its running jobs asked to stop (``worker.cancel_watch``)."""
    return f"darkroom:cancel:{worker}"
