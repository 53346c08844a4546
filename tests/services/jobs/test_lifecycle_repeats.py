"""A worker's claim and outcome are safe to repeat: when Redis applied a change but its reply was lost with
the connection, the worker's retry (same ``at``) finds exactly that change and counts it as made — once,
with its events appended once — while a different change (another time, another worker) is refused."""

from __future__ import annotations

from datetime import timedelta

import redis as redis_lib

from schemas.jobs import JobStatus
from services.jobs import Lifecycle, utcnow
from services.jobs.keys import OUTBOX
from services.jobs.outcome import Succeeded
from tests.fixtures.jobs import lifecycle_record, queued_job

HOOK = {"url": "https://receiver.example/hook", "events": ["started", "completed"]}


def commandstats_calls(redis: redis_lib.Redis, command: str) -> int:
    """How often Redis ran ``command`` (scripts' commands included)."""
    stats = redis.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


def test_a_claim_whose_reply_was_lost_counts_as_made(redis_client: redis_lib.Redis) -> None:
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    record = queued_job(redis_client, webhook=HOOK)
    at = utcnow()
    assert lifecycle.claim(record.id, "worker-a", at=at).applied
    hmget_calls = commandstats_calls(redis_client, "hmget")
    again = lifecycle.claim(record.id, "worker-a", at=at)  # the retry of a claim whose reply was lost
    assert again.applied and again.previous is JobStatus.QUEUED
    # Judged from the record the refusing script sent back (no read of its own), which it hands on.
    assert commandstats_calls(redis_client, "hmget") == hmget_calls
    assert again.record == lifecycle_record(redis_client, record.id)
    # Another claim — a later one of ours, or another worker's at the same moment — is not ours.
    later = lifecycle.claim(record, "worker-a", at=at + timedelta(seconds=1))
    assert not later.applied and later.previous is JobStatus.RUNNING
    assert not lifecycle.claim(record, "worker-b", at=at).applied
    assert lifecycle_record(redis_client, record.id).worker == "worker-a"
    assert redis_client.xlen(OUTBOX) == 1  # one generation.started


def test_an_outcome_whose_reply_was_lost_counts_as_made(redis_client: redis_lib.Redis) -> None:
    lifecycle = Lifecycle(redis_client, timedelta(days=1))
    record = queued_job(redis_client, webhook=HOOK)
    assert lifecycle.claim(record, "worker-a").applied
    outcome, at = Succeeded(images=[]), utcnow()
    assert lifecycle.finish(record, "worker-a", outcome, at=at).applied
    # The script ran but the connection died before its reply: the retry finds exactly our outcome.
    again = lifecycle.finish(record, "worker-a", outcome, at=at)
    assert again.applied and again.previous is JobStatus.RUNNING
    # Someone else's outcome (another completion time, or another worker's) is not mistaken for ours.
    later = lifecycle.finish(record, "worker-a", outcome, at=at + timedelta(seconds=1))
    assert not later.applied and later.previous is JobStatus.SUCCEEDED
    assert not lifecycle.finish(record, "worker-b", outcome, at=at).applied
    stored = lifecycle_record(redis_client, record.id)
    assert stored.status is JobStatus.SUCCEEDED and stored.completed_at == at
    assert redis_client.xlen(OUTBOX) == 2  # generation.started, one generation.succeeded
