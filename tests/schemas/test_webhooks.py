"""The one webhook vocabulary: old names are aliases, normalised at validation; responses and stored-record
reads show canonical names only."""

from __future__ import annotations

from typing import Any, get_args

import pytest
from pydantic import ValidationError

from schemas.batches import BatchWebhookStatus, CreateBatch
from schemas.jobs import CreateGeneration, WebhookStatus
from schemas.webhooks import (
    EVENT_ALIASES,
    GENERATION_EVENTS,
    TERMINAL_EVENTS,
    BatchEventName,
    JobEventName,
    WebhookEvent,
    canonical_events,
    default_batch_events,
    default_job_events,
)

END = [event.value for event in TERMINAL_EVENTS]
JOB: dict[str, Any] = {"prompt": "a fox", "webhook_url": "https://example.com/hook"}


def test_the_names_requests_may_use_are_the_events_and_their_aliases() -> None:
    generation = [event.value for event in GENERATION_EVENTS]
    assert list(get_args(JobEventName)) == [*generation, *EVENT_ALIASES]
    assert list(get_args(BatchEventName)) == [*generation, "batch.completed", *EVENT_ALIASES]
    assert default_job_events() == END and default_batch_events() == ["batch.completed"]


@pytest.mark.parametrize(
    ("named", "canonical"),
    [
        (["started"], ["generation.started"]),
        (["progress", "generation.progress"], ["generation.progress"]),
        (["completed"], END),
        (["generation.completed", "started"], [*END, "generation.started"]),
        (
            ["generation.failed", "completed"],
            ["generation.failed", "generation.succeeded", "generation.canceled"],
        ),
    ],
)
def test_a_job_s_aliases_are_normalised(named: list[str], canonical: list[str]) -> None:
    assert CreateGeneration.model_validate({**JOB, "webhook_events": named}).webhook_events == canonical


def test_defaults_are_the_job_s_end_and_the_batch_s_completion() -> None:
    assert CreateGeneration.model_validate(JOB).webhook_events == END
    batch = CreateBatch.model_validate({"template": {"prompt": "x"}, "count": 2})
    assert batch.webhook_events == ["batch.completed"] and batch.item_webhook_events() == []


def test_a_batch_takes_all_six_and_the_old_batch_names() -> None:
    body = {"template": {"prompt": "x"}, "count": 2, "webhook_events": ["generation.completed", "started"]}
    batch = CreateBatch.model_validate(body)
    assert batch.webhook_events == [*END, "generation.started"] == batch.item_webhook_events()


@pytest.mark.parametrize("events", [["batch.completed"], ["exploded"], [], "completed"])
def test_a_single_job_refuses_batch_and_unknown_events(events: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        CreateGeneration.model_validate({**JOB, "webhook_events": events})
    [error] = caught.value.errors()
    assert error["loc"][0] == "webhook_events"
    if events == ["batch.completed"]:
        assert "batch event" in error["msg"]


def test_records_stored_with_old_names_read_as_canonical_names() -> None:
    assert WebhookStatus(url="u", events=["started", "completed"]).events == [  # type: ignore[arg-type]
        WebhookEvent.GENERATION_STARTED,
        *TERMINAL_EVENTS,
    ]
    old_batch = BatchWebhookStatus(url="u", events=["batch.completed", "generation.completed"])  # type: ignore[arg-type]
    assert old_batch.events == [WebhookEvent.BATCH_COMPLETED, *TERMINAL_EVENTS]
    assert canonical_events(["damaged", "progress"]) == [WebhookEvent.GENERATION_PROGRESS]
