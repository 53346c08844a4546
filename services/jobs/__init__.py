"""Generation jobs and batches: where they live in Redis, how they are read, and the one module that
changes their status.

- ``keys``      — the Redis key layout of jobs, batches and the outbox
- ``records``   — a job as stored (``JobRecord``) and its codecs
- ``store``     — reading jobs, and the webhook delivery records kept beside them
- ``batches``   — reading batches
- ``outcome``   — how a run ended, as a typed value
- ``lifecycle`` — every status transition and all of its side effects, events through the outbox
- ``outbox``    — the stream of webhook events those transitions append, and its consumer-group API
- ``recovery``  — lost-job recovery, asking the lifecycle to requeue or fail
"""

from services.jobs.keys import RUNNING_SET, events_key, job_key, webhooks_key
from services.jobs.lifecycle import EVENTS_MAXLEN, Lifecycle, Transition
from services.jobs.records import (
    JobRecord,
    decode_deliveries,
    decode_event,
    encode_fields,
    new_job_id,
    utcnow,
)
from services.jobs.store import JobStore

__all__ = [
    "EVENTS_MAXLEN",
    "RUNNING_SET",
    "JobRecord",
    "JobStore",
    "Lifecycle",
    "Transition",
    "decode_deliveries",
    "decode_event",
    "encode_fields",
    "events_key",
    "job_key",
    "new_job_id",
    "utcnow",
    "webhooks_key",
]
