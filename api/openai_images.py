"""``POST /v1/images/generations``: OpenAI's Images API over our jobs, so the ``openai`` SDKs just work.

A request becomes an ordinary generation job — the same validation, Idempotency-Key, rate limit and queue
ceiling as ``POST /v1/generations``, owned by the same API key — and the route waits for it as
``Prefer: wait`` does, then answers OpenAI's ``ImagesResponse``. A job still unfinished after
``DARKROOM_OPENAI_IMAGES_WAIT`` gets 504 ``generation_timeout`` with its ``Location``: it carries on, and
``GET /v1/generations/{id}`` (or this call again with the same ``Idempotency-Key``) picks up its result.

Errors are our problem details plus OpenAI's ``error`` member (``api.errors.problem_response``). Answers
that leave a job behind say ``x-should-retry: false``: the SDK retries 409 and 5xx on its own, and a retry
would start the same work again.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api.auth import PrincipalDep
from api.contract import SERVER_BUSY, SUBMIT, TOO_MANY_WAITS, problem_responses
from api.deps import LinksDep, StateDep
from api.errors import ApiError, UnprocessableRequest
from api.generations import service
from api.generations.events import wait_until_finished
from api.limits import submission_token
from api.state import AppState
from api.submissions import model_not_found
from api.waits import disconnected
from schemas.jobs import Job, JobError, JobStatus
from schemas.openai_images import (
    SERVED_MODEL_ALIAS,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    OpenAICompatibleProblem,
    openai_field_errors,
    served_model_name,
)
from services.jobs import JobRecord
from services.storage import Storage

router = APIRouter(prefix="/v1/images", tags=["images"])

NO_RETRY = {"x-should-retry": "false"}
_ERRORS = problem_responses(
    *SUBMIT,
    409,
    504,
    model=OpenAICompatibleProblem,
    described={
        422: "Validation error, or `content_filtered`: the prompt holds a blocklisted term, or the content "
        "filter withheld every image of the job (then with Location).",
        409: "The job was canceled while this request waited (code `canceled`).",
        500: "The job failed (its `error.type` is the code, e.g. `out_of_memory`; with Location), or a bug "
        "on the server's side (`internal_error`).",
        504: "Not finished within DARKROOM_OPENAI_IMAGES_WAIT, or the server began to shut down first (code "
        "`generation_timeout`); the job carries on at Location.",
        429: f"Too many submissions for this API key (`rate_limited`), or {TOO_MANY_WAITS}; nothing is "
        "queued.",
        503: "A dependency is unreachable (`redis_unavailable`, `storage_unavailable`), the queue is full "
        f"(`queue_full`), or {SERVER_BUSY}; nothing is queued.",
    },
)
_ERRORS[504]["headers"] = {"Location": {"description": "The job's URL.", "schema": {"type": "string"}}}


def _served_model(state: AppState, model: str | None) -> str | None:
    """The served model ``model`` names (None: the default); 422 ``model_not_found`` otherwise."""
    if model is None:
        return None
    name = served_model_name(model, tuple(state.lines))
    if name is None:
        raise model_not_found(state, model, default_alias=SERVED_MODEL_ALIAS)
    return name


def _check_succeeded(job: Job, waited_s: float, *, shutting_down: bool = False) -> None:
    if job.status is JobStatus.SUCCEEDED:
        return
    location = f"/v1/generations/{job.id}"
    if not job.status.is_terminal:
        why = "before this server began to shut down" if shutting_down else f"within {waited_s:g} s"
        raise ApiError(
            f"job {job.id} did not finish {why} and carries on ({job.status.value}): read it "
            f"at {location}, or repeat this request with the same Idempotency-Key to wait again",
            status=504,
            code="generation_timeout",
            headers={"Location": location, **NO_RETRY},
        )
    error = job.error or JobError(type="generation_failed", message="no reason recorded")
    status = 409 if job.status is JobStatus.CANCELED else 500
    raise ApiError(
        f"job {job.id} {job.status.value} ({error.type}): {error.message}",
        status=status,
        code=error.type,
        headers={"Location": location, **NO_RETRY},
    )


def _check_not_all_filtered(job: Job) -> None:
    """Every image withheld by the content filter: an error (as OpenAI answers a moderation block), not a
    200 whose ``data`` holds nothing to decode. Some withheld: they stay in ``data``, marked."""
    if job.images and all(image.finish_reason == "content_filtered" for image in job.images):
        count = len(job.images)
        raise UnprocessableRequest(
            f"the content filter withheld {'the image' if count == 1 else f'all {count} images'} of job "
            f"{job.id}; nothing was stored",
            code="content_filtered",
            headers={"Location": f"/v1/generations/{job.id}", **NO_RETRY},
        )


def _read_images(storage: Storage, record: JobRecord) -> list[str | None]:
    """Each image base64-encoded, in job order; None for one the content filter withheld (never stored)."""
    return [
        base64.b64encode(storage.read(image["key"])).decode("ascii") if "key" in image else None
        for image in record.images
    ]


@router.post(
    "/generations",
    dependencies=[Depends(submission_token)],
    response_model=ImagesResponse,
    summary="Generate images (OpenAI-compatible)",
    operation_id="createImage",
    response_description="The finished images, as OpenAI's ImagesResponse.",
    responses=_ERRORS,
)
async def create_image(
    body: ImageGenerationRequest,
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    links: LinksDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            description="Same key + same request → the same job (a repeat after a 504 waits for it "
            "again); compared with defaults filled in, as on POST /v1/generations.",
        ),
    ] = None,
) -> Response:
    """OpenAI's ``images.generate``: queue a job, wait for it, answer its images (base64 or signed URLs).

    The job is a normal one (``id`` in the answer; readable at ``/v1/generations/{id}``). ``size`` must be a
    size the model draws (OpenAI's, except 256x256); ``quality`` presets the step count; ``style``,
    ``moderation`` and ``user`` are accepted and ignored. Extensions: ``seed``, ``negative_prompt``,
    ``num_inference_steps``, ``guidance_scale`` (``extra_body`` in the SDK). Errors are problem details that
    also carry OpenAI's ``error`` object (``message``, ``type``, ``param``, ``code``), which the SDKs read.
    """
    model = _served_model(state, body.model)
    try:
        generation = body.generation(model)
    except ValidationError as exc:
        raise RequestValidationError(openai_field_errors(exc)) from None
    waited_s = state.settings.openai_images_wait.total_seconds()
    # The key's share of waits is checked before anything is queued.
    async with state.waits.hold(principal) as lease:
        submission = await service.submit(state, principal, generation, idempotency_key, links=links)
        # Until the job ends, the time is up, the client leaves or the server begins to shut down.
        await state.waits.until(
            wait_until_finished(state.waits.blocking, submission.job_id, waited_s),
            disconnected(request.receive),
        )
        # The lease goes back in the round trip of that read (or, should the read fail, on leaving).
        release = state.waits.release_riders(lease)
        job, record = await service.view_with_record(
            state, principal, submission.job_id, links=links, riders=release
        )
    _check_succeeded(job, waited_s, shutting_down=state.waits.shutdown.is_set())
    _check_not_all_filtered(job)
    if body.wants_url:
        data = [
            ImageData(url=image.url, seed=image.seed, finish_reason=image.finish_reason)
            for image in job.images
        ]
    else:  # the images' keys from the record the job was read from: no second read
        encoded = await run_in_threadpool(_read_images, state.clients.storage, record)
        data = [
            ImageData(b64_json=b64, seed=image.seed, finish_reason=image.finish_reason)
            for b64, image in zip(encoded, job.images, strict=True)
        ]
    finished = job.completed_at or job.created_at
    answer = ImagesResponse(
        created=int(finished.timestamp()),
        data=data,
        output_format=job.request.output_format,
        size=f"{job.request.width}x{job.request.height}",
        id=job.id,
    )
    return Response(answer.model_dump_json(exclude_none=True), media_type="application/json")
