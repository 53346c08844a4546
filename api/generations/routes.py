"""``/v1/generations``: submit, read, cancel, and follow generation jobs."""

from __future__ import annotations

import re
from contextlib import AsyncExitStack
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.responses import StreamingResponse

from api.auth import PrincipalDep
from api.contract import (
    LIMITED_READ,
    POLL_HINT,
    READ,
    SERVER_BUSY,
    SUBMIT,
    TOO_MANY_WAITS,
    WAITS,
    event_stream_response,
    problem_responses,
)
from api.deps import LinksDep, StateDep
from api.generations import service
from api.generations.events import sse_stream, wait_until_finished
from api.generations.prefer import preferred_wait
from api.limits import read_token_riders, submission_token
from api.waits import LeasedStreamingResponse, disconnected
from schemas.jobs import CreateGeneration, Job
from services import queue_order

JobId = Annotated[
    str,
    Path(description="The job's id (`gen_` and 32 hex digits); any other value is 404 `not_found`."),
]

router = APIRouter(prefix="/v1/generations", tags=["generations"])


def _job_response(job: Job, status_code: int, headers: dict[str, str] | None = None) -> Response:
    # Serialised by pydantic-core in one pass (no dict of Python objects for json.dumps to walk again).
    return Response(job.model_dump_json(), status_code, headers, media_type="application/json")


_LOCATION = {"Location": {"description": "The job's URL.", "schema": {"type": "string"}}}


@router.post(
    "",
    status_code=202,
    dependencies=[Depends(submission_token)],
    response_model=Job,
    summary="Submit a generation job",
    operation_id="createGeneration",
    response_description="Queued (or still running after 'Prefer: wait'): follow it at Location.",
    responses={
        200: {
            "model": Job,
            "description": "Finished within the 'Prefer: wait' time.",
            "headers": {
                **_LOCATION,
                "Preference-Applied": {"description": "wait=N, as honoured.", "schema": {"type": "string"}},
            },
        },
        202: {"headers": {**_LOCATION, **POLL_HINT}},
        **problem_responses(
            *SUBMIT,
            described={
                422: "Validation error (`validation_error`, `malformed_json`), a rule violation, or "
                "`content_filtered`: the prompt holds a term on the server's blocklist (the field is named, "
                "the term is not echoed).",
                429: f"Too many submissions for this API key (`rate_limited`), or with 'Prefer: wait' "
                f"{TOO_MANY_WAITS}; nothing is queued.",
                503: "A dependency is unreachable (`redis_unavailable`, `storage_unavailable`), the queue is "
                f"full (`queue_full`), or with 'Prefer: wait' {SERVER_BUSY}; nothing is queued.",
            },
        ),
    },
)
async def create_generation(
    body: CreateGeneration,
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    links: LinksDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            description="Same key + same request → the same job; same key + another request → 422 "
            "`idempotency_key_reused`. Requests are compared with defaults filled in (omitting a field "
            "and sending its default are the same request), before the server picks a seed: no seed "
            "and a given seed differ.",
        ),
    ] = None,
    prefer: Annotated[
        str | None,
        Header(
            description="wait=N (N ≤ 60): answer 200 with the job if it finishes in time. A wait that is "
            "not a whole number of seconds → 422 `invalid_prefer_header`; other preferences are ignored."
        ),
    ] = None,
) -> Response:
    """Validate and queue a job; answers 202 with the job and its ``Location``.

    ``Idempotency-Key``: the same key with the same request returns the same job; with another, 422.
    Requests compare with their defaults filled in, so a client that spells out every default and one
    that sends only the prompt make the same request.
    ``Prefer: wait=N`` (N ≤ 60): answer 200 with the finished job if it ends within N seconds; a ``wait``
    that is not a whole number of seconds is refused (422 ``invalid_prefer_header``), nothing queued.
    With a prompt blocklist configured, a prompt that holds a blocked term is refused with 422
    ``content_filtered`` and nothing is queued; with an image classifier, each image the classifier
    withholds is listed with ``finish_reason: content_filtered`` and no ``url``.
    """
    wait_s = preferred_wait(prefer, state.settings.max_wait.total_seconds())  # a bad one queues nothing
    async with AsyncExitStack() as held:
        lease = None
        if wait_s > 0:  # the key's share of waits is checked before anything is queued
            lease = await held.enter_async_context(state.waits.hold(principal))
        submission = await service.submit(state, principal, body, idempotency_key, links=links)
        headers = {"Location": f"/v1/generations/{submission.job_id}"}
        job, hint = submission.job, submission.retry_after
        if lease is not None:
            headers["Preference-Applied"] = f"wait={int(wait_s)}"
            # Until the job ends, the time is up, the client leaves or the server begins to shut down:
            # then the admitted job is answered as it stands (202 with its Location unless finished).
            await state.waits.until(
                wait_until_finished(state.waits.blocking, submission.job_id, wait_s),
                disconnected(request.receive),
            )
            # The lease goes back in the round trip of that read (or, should the read fail, on leaving).
            release = state.waits.release_riders(lease)
            job, hint = await service.polled_view(
                state, principal, submission.job_id, links=links, riders=release
            )
    if job is None:  # an Idempotency-Key replay: the existing job, read
        job, hint = await service.polled_view(state, principal, submission.job_id, links=links)
    headers.update(queue_order.header(hint))
    return _job_response(job, 200 if job.status.is_terminal and wait_s > 0 else 202, headers)


@router.get(
    "/{job_id}",
    response_model=Job,
    summary="Read a job",
    operation_id="getGeneration",
    response_description="The job.",
    responses={200: {"headers": POLL_HINT}, **problem_responses(*LIMITED_READ)},
)
async def get_generation(
    job_id: JobId, state: StateDep, principal: PrincipalDep, links: LinksDep
) -> Response:
    """The job with image URLs signed now (they expire; read again for fresh ones). While it is queued or
    running, ``Retry-After`` says when a poll is worth making."""
    # The key's read token is taken in the read's own round trip (429 rate_limited as read_token answers).
    token = read_token_riders(state, principal)
    job, hint = await service.polled_view(state, principal, job_id, links=links, riders=token)
    return _job_response(job, 200, queue_order.header(hint))


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    summary="Cancel a job",
    operation_id="cancelGeneration",
    response_description="Canceled while queued.",
    responses={
        202: {"model": Job, "description": "Running: it stops at the next denoising step."},
        **problem_responses(
            *READ, 409, described={409: "The job has already ended (`job_already_finished`)."}
        ),
    },
)
async def cancel_generation(
    job_id: JobId, state: StateDep, principal: PrincipalDep, links: LinksDep
) -> Response:
    """Queued → canceled at once (200). Running → interrupted at the next step (202). Finished → 409."""
    job = await service.cancel(state, principal, job_id, links=links)
    return _job_response(job, 200 if job.status.is_terminal else 202)


@router.get(
    "/{job_id}/events",
    summary="Follow a job (Server-Sent Events)",
    operation_id="streamGenerationEvents",
    response_class=StreamingResponse,
    responses={
        200: event_stream_response(
            "`status` and `progress` events, then one `job` event; each frame's JSON `data` is "
            "described by GenerationStreamEvent."
        ),
        **problem_responses(
            *LIMITED_READ,
            described={
                429: "Too many reads for this API key (`rate_limited`), or waiting refused: "
                f"{TOO_MANY_WAITS}.",
                503: WAITS[503],
            },
        ),
    },
)
async def generation_events(
    job_id: JobId,
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    links: LinksDep,
    last_event_id: Annotated[
        str | None, Header(description="Resume after this event id (reconnecting clients send it).")
    ] = None,
) -> Response:
    """``status`` and ``progress`` events as they happen, then a ``job`` event with the final job; closes."""
    # 404 before the stream starts (429 before that: the read token rides with the read, as on GET); a
    # job that has left Redis replays its archived events
    token = read_token_riders(state, principal)
    _, archived = await service.load_with_archive(state, principal, job_id, riders=token)

    async def final_job() -> dict[str, Any]:
        job = await service.view(state, principal, job_id, links=links)
        return job.model_dump(mode="json")

    resume_from = last_event_id if last_event_id and _is_stream_id(last_event_id) else "0-0"
    waits = state.waits
    lease = await waits.acquire(principal)  # 429 / 503 before the stream starts
    stream = sse_stream(
        waits.blocking,
        job_id,
        resume_from,
        final_job,
        request.is_disconnected,
        waits.shutdown,
        archived=archived.events_after if archived else None,
    )
    return LeasedStreamingResponse(
        stream,
        release=lambda: waits.release(lease),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


_STREAM_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_MAX_STREAM_ID_PART = 2**64 - 1


def _is_stream_id(value: str) -> bool:
    """A Redis stream id Redis itself accepts (``ms`` or ``ms-seq``, each an unsigned 64-bit integer):
    anything else in Last-Event-ID would make XREAD fail after the stream has started."""
    match = _STREAM_ID.fullmatch(value)
    return match is not None and all(
        int(part) <= _MAX_STREAM_ID_PART for part in match.groups() if part is not None
    )
