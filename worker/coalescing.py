"""Coalescing: which waiting jobs a worker takes along into the pipeline call of a job it just claimed.

With ``DARKROOM_COALESCE_MAX`` above 1, a worker that claimed a text-to-image job looks at the first
``lookahead`` jobs still waiting on the same queue and claims those with the same
:func:`worker.engine.coalesce_key`, up to ``coalesce_max`` jobs and images in all, without waiting for
more (unless ``linger``). Partners come from the leader's own queue: batch items with batch items (they
share a size and steps more often than not), interactive jobs with interactive jobs — so a batch never
delays an interactive job, nor jumps the interactive queue.

What makes a job ours is the lifecycle's atomic QUEUED -> RUNNING claim, the same one every run goes
through; for a partner it also takes the id off RQ's list and marks RQ's job started, in the same step
(``rq_records.taken_by``), so RQ never shows it queued. A worker that dequeues an id we claimed a moment
before finds it running and skips it.

Partners are not in RQ's started registry (only the job RQ itself dequeued is): lost-job recovery works
from the running set and heartbeats, and puts a lost partner back like any other job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from pydantic import ValidationError
from rq import Queue

from schemas.generation import NORMALIZED_CONTEXT, GenerationRequest
from services import rq_records
from services.clients import REDIS_UNAVAILABLE
from services.jobs import JobRecord, JobStore, job_key
from worker.engine import CoalesceKey, coalesce_key


@dataclass(frozen=True)
class Coalescing:
    """How a worker coalesces: ``max_jobs`` 1 turns it off."""

    max_jobs: int = 1
    linger: timedelta = timedelta(0)
    lookahead: int = 16
    generation_queue: Queue | None = None
    batch_queue: Queue | None = None  # batch items' partners come from it

    def queue_of(self, leader: JobRecord) -> Queue | None:
        return self.batch_queue if leader.batch_id else self.generation_queue


@dataclass(frozen=True)
class Candidate:
    """A job waiting on the queue, as far as choosing partners needs to know it."""

    job_id: str
    key: CoalesceKey | None
    num_images: int


def request_coalesce_key(request: dict[str, Any] | None, init_image_key: str | None) -> CoalesceKey | None:
    """The coalesce key of a stored (normalised) request; None if it must run alone or cannot be read."""
    if init_image_key or not request:
        return None
    try:
        parsed = GenerationRequest.model_validate(request, context=NORMALIZED_CONTEXT)
    except ValidationError:
        return None  # the run itself reports what is wrong with it
    return coalesce_key(parsed)


def images_of(record: JobRecord) -> int:
    return int(record.request.get("num_images", 1))


def waiting_candidates(store: JobStore, queue: Queue, lookahead: int) -> list[Candidate]:
    """The first ``lookahead`` jobs on the queue that are still ``queued``: two round trips in all."""
    job_ids = rq_records.waiting_ids(store.redis, queue, lookahead)
    with store.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(job_key(job_id), ["status", "request", "init_image_key"])
        rows = cast(list[list[bytes | None]], pipe.execute())
    found = []
    for job_id, (status, request, init_image_key) in zip(job_ids, rows, strict=True):
        if status != b"queued" or request is None:
            continue
        parsed = json.loads(request)
        key = request_coalesce_key(parsed, init_image_key.decode() if init_image_key else None)
        found.append(Candidate(job_id, key, int(parsed.get("num_images", 1))))
    return found


def take_partners(
    store: JobStore,
    coalescing: Coalescing,
    leader: JobRecord,
    claim: Callable[[str, Queue], JobRecord | None],
) -> list[JobRecord]:
    """Claim (``claim(job_id, queue)``: the record if it became ours, None if not: canceled, another
    worker's, gone) up to ``max_jobs - 1`` waiting jobs that can share the leader's pipeline call, and at
    most ``max_jobs`` images in all. Looks only at what is queued now, unless ``linger``. A candidate is
    not read again before its claim: the claim refuses a job no longer queued, and replies with the
    record of one it takes."""
    queue = coalescing.queue_of(leader)
    key = request_coalesce_key(leader.request, leader.init_image_key)
    room_jobs, room_images = coalescing.max_jobs - 1, coalescing.max_jobs - images_of(leader)
    if queue is None or key is None or room_jobs < 1 or room_images < 1:
        return []
    linger_until = time.monotonic() + coalescing.linger.total_seconds()
    seen: set[str] = {leader.id}
    partners: list[JobRecord] = []
    while True:
        try:
            candidates = waiting_candidates(store, queue, coalescing.lookahead)
        except REDIS_UNAVAILABLE:
            return partners
        for candidate in candidates:
            if candidate.job_id in seen or candidate.key != key or candidate.num_images > room_images:
                continue
            seen.add(candidate.job_id)
            record = claim(candidate.job_id, queue)
            if record is None:
                continue  # canceled, another worker's now, or gone
            partners.append(record)
            room_jobs -= 1
            room_images -= images_of(record)
            if room_jobs < 1 or room_images < 1:
                return partners
        remaining = linger_until - time.monotonic()
        if remaining <= 0:
            return partners
        time.sleep(min(0.02, remaining))
