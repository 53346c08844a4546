"""The one webhook event vocabulary: what a job or batch subscribes to is what its receiver is sent.

Six events, named as they are delivered (the ``type`` of every payload). Single jobs subscribe to the
``generation.*`` ones; batches to all six, their ``generation.*`` ones applying to every item.

Earlier releases had three vocabularies (``started|progress|completed`` for jobs,
``generation.started|generation.completed`` for batches, and the delivered types). The old names stay
accepted as documented aliases — so clients written against them keep working — and are normalised here, at
validation, to the canonical names: stored records and every response carry canonical names only. Records
queued before the upgrade may still hold old names in Redis; the lifecycle's Lua check knows the same
table (``services.jobs.lifecycle``), and :func:`canonical_events` normalises them on read.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator


class WebhookEvent(StrEnum):
    """An event a receiver can be sent, by its delivered ``type``."""

    GENERATION_STARTED = "generation.started"  # a worker took the job
    GENERATION_PROGRESS = "generation.progress"  # a denoising step ended (at most one a second)
    GENERATION_SUCCEEDED = "generation.succeeded"  # the job ended with its images
    GENERATION_FAILED = "generation.failed"  # the job ended without them (``error`` says why)
    GENERATION_CANCELED = "generation.canceled"  # the job ended on a cancel request
    BATCH_COMPLETED = "batch.completed"  # a batch's last item ended (batches only)


#: The job's end: exactly one of these is sent per job. A job's default subscription.
TERMINAL_EVENTS: tuple[WebhookEvent, ...] = (
    WebhookEvent.GENERATION_SUCCEEDED,
    WebhookEvent.GENERATION_FAILED,
    WebhookEvent.GENERATION_CANCELED,
)
GENERATION_EVENTS: tuple[WebhookEvent, ...] = tuple(
    e for e in WebhookEvent if e.value.startswith("generation.")
)

#: Old names, still accepted, and the canonical events each stands for.
EVENT_ALIASES: dict[str, tuple[WebhookEvent, ...]] = {
    "started": (WebhookEvent.GENERATION_STARTED,),
    "progress": (WebhookEvent.GENERATION_PROGRESS,),
    "completed": TERMINAL_EVENTS,
    "generation.completed": TERMINAL_EVENTS,
}

# What requests may name (canonical names, then aliases): the JSON schema's enum, so old clients validate.
# Spelled out because a Literal must be; tests/schemas/test_webhooks.py checks it against the enum and table.
JobEventName = Literal[
    "generation.started",
    "generation.progress",
    "generation.succeeded",
    "generation.failed",
    "generation.canceled",
    "started",
    "progress",
    "completed",
    "generation.completed",
]
BatchEventName = Literal[
    "generation.started",
    "generation.progress",
    "generation.succeeded",
    "generation.failed",
    "generation.canceled",
    "batch.completed",
    "started",
    "progress",
    "completed",
    "generation.completed",
]

_ALIASES_TEXT = (
    "Aliases (older names, accepted and normalised to canonical names): started = generation.started, "
    "progress = generation.progress, completed and generation.completed = the three terminal events "
    "(generation.succeeded, generation.failed, generation.canceled)."
)
JOB_EVENTS_DESCRIPTION = (
    "Which events to deliver: generation.started, generation.progress (at most one a second), "
    "generation.succeeded, generation.failed, generation.canceled. Default: the three terminal events "
    "(the job's end). " + _ALIASES_TEXT
)
BATCH_EVENTS_DESCRIPTION = (
    "Which events to deliver: batch.completed (once, when the last item ends; the default), and the "
    "generation.* events, which apply to every item (generation.started, generation.progress, "
    "generation.succeeded, generation.failed, generation.canceled). " + _ALIASES_TEXT
)


def canonical_events(names: Iterable[str]) -> list[WebhookEvent]:
    """``names`` with aliases expanded, duplicates dropped, in the order first named.

    A name that is neither is skipped, as the lifecycle's Lua check skips it: requests are checked against
    the enum before they get here, so only a damaged stored record could hold one, and reading that
    record (a GET, the worker's progress check) should not fail over it.
    """
    events: dict[WebhookEvent, None] = {}
    for name in names:
        if name in EVENT_ALIASES:
            events.update(dict.fromkeys(EVENT_ALIASES[name]))
        elif name in _NAMES:
            events[WebhookEvent(name)] = None
    return list(events)


_NAMES = frozenset(event.value for event in WebhookEvent)


def default_job_events() -> list[JobEventName]:
    """A job's subscription when it names none: its end (:data:`TERMINAL_EVENTS`)."""
    return ["generation.succeeded", "generation.failed", "generation.canceled"]


def default_batch_events() -> list[BatchEventName]:
    """A batch's subscription when it names none: ``batch.completed`` only."""
    return ["batch.completed"]


def _not_a_batch_event(name: object) -> object:
    if name == WebhookEvent.BATCH_COMPLETED:
        raise ValueError(
            "batch.completed is a batch event: subscribe to it on POST /v1/batches; a single job "
            "delivers the generation.* events"
        )
    return name


def _canonical(names: list[str]) -> list[str]:
    return [event.value for event in canonical_events(names)]


#: ``webhook_events`` of a single job: its enum lists canonical names and aliases; the value is canonical.
JobSubscription = Annotated[
    list[Annotated[JobEventName, BeforeValidator(_not_a_batch_event)]], AfterValidator(_canonical)
]
#: ``webhook_events`` of a batch: all six events (and the aliases); the value is canonical.
BatchSubscription = Annotated[list[BatchEventName], AfterValidator(_canonical)]
#: A subscription as responses show it (and as stored records are read: old names normalised).
Subscribed = Annotated[list[WebhookEvent], BeforeValidator(lambda names: canonical_events(names))]
