"""``/v1/batches``: submit up to 1,000 generation jobs as one batch, follow it, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response

from api.auth import PrincipalDep
from api.batches import service
from api.contract import LIMITED_READ, READ, SUBMIT, problem_responses
from api.deps import LinksDep, StateDep
from api.limits import read_token, submission_token
from schemas.batches import DEFAULT_PAGE, MAX_PAGE, Batch, BatchList, CreateBatch

BatchId = Annotated[
    str,
    Path(description="The batch's id (`batch_` and 32 hex digits); any other value is 404 `not_found`."),
]

router = APIRouter(prefix="/v1/batches", tags=["batches"])

MAX_LIST_PAGE = 100  # each listed batch is read from its hash alone (counts kept there)
_LOCATION = {"Location": {"description": "The batch's URL.", "schema": {"type": "string"}}}


def _batch_response(batch: Batch, status_code: int, headers: dict[str, str] | None = None) -> Response:
    return Response(batch.model_dump_json(), status_code, headers, media_type="application/json")


@router.post(
    "",
    status_code=202,
    response_model=Batch,
    summary="Submit a batch of generation jobs",
    operation_id="createBatch",
    dependencies=[Depends(submission_token)],
    response_description="Queued: every item is a generation job on the batch queue; follow it at Location.",
    responses={
        202: {"headers": _LOCATION},
        **problem_responses(
            *SUBMIT,
            described={
                413: "The body is larger than the API accepts (`payload_too_large`), or the batch would "
                "store more than the server takes in one batch or cost more batch tokens than a key may "
                "spend at once (`batch_too_large`).",
                429: "Too many submissions or batch tokens spent for this API key (`rate_limited`), or it "
                "holds its share of the batch queue (`queue_share_exceeded`).",
            },
        ),
    },
)
async def create_batch(
    body: CreateBatch,
    state: StateDep,
    principal: PrincipalDep,
    links: LinksDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            description="Same key + same request → the same batch; same key + another request → 422 "
            "`idempotency_key_reused`. Requests are compared with defaults filled in (omitting a field "
            "and sending its default are the same request), before the server picks seeds.",
        ),
    ] = None,
) -> Response:
    """Validate every item, then queue them all (or none): 202 with the batch and its ``Location``.

    ``requests`` (1..1,000 generation requests), or ``template`` with ``seeds`` (one item per seed) or
    ``count``. Items wait on a lower-priority queue: a worker takes one only when no interactive job
    waits. ``webhook_events``: ``batch.completed`` (once, after the last item), and per item
    ``generation.started`` / ``generation.completed``. Each item is readable at
    ``/v1/generations/{id}`` (it carries ``batch_id``).
    """
    submission = await service.submit(state, principal, body, idempotency_key)
    headers = {"Location": f"/v1/batches/{submission.batch_id}"}
    batch = submission.batch or await service.view(state, principal, submission.batch_id, links=links)
    return _batch_response(batch, 202, headers)


@router.get(
    "",
    response_model=BatchList,
    summary="List your batches",
    operation_id="listBatches",
    dependencies=[Depends(read_token)],
    responses=problem_responses(401, 422, 429, 500, 503),
)
async def list_batches(
    state: StateDep,
    principal: PrincipalDep,
    offset: Annotated[int, Query(ge=0, le=100_000, description="First batch of the page (0-based).")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_PAGE, description="Batches in the page.")] = 20,
) -> Response:
    """The batches this API key created and still retained, newest first, with status and counts (read
    one for its items); ``next_offset`` reads the next page (null at the end)."""
    page = await service.list_batches(state, principal, offset, limit)
    return Response(page.model_dump_json(), 200, media_type="application/json")


@router.get(
    "/{batch_id}",
    response_model=Batch,
    summary="Read a batch",
    operation_id="getBatch",
    response_description="The batch: status, counts over all items, and one page of items.",
    dependencies=[Depends(read_token)],
    responses=problem_responses(*LIMITED_READ, 422),
)
async def get_batch(
    batch_id: BatchId,
    state: StateDep,
    principal: PrincipalDep,
    links: LinksDep,
    offset: Annotated[int, Query(ge=0, le=100_000, description="First item of the page (0-based).")] = 0,
    limit: Annotated[int, Query(ge=0, le=MAX_PAGE, description="Items in the page.")] = DEFAULT_PAGE,
) -> Response:
    """Status and counts cover every item; ``items`` is the page ``offset``..``offset + limit`` in
    submission order, with image URLs signed now; ``next_offset`` reads the next page (null at the end)."""
    return _batch_response(await service.view(state, principal, batch_id, offset, limit, links=links), 200)


@router.post(
    "/{batch_id}/cancel",
    response_model=Batch,
    summary="Cancel a batch",
    operation_id="cancelBatch",
    response_description="Every item has ended.",
    responses={
        202: {"model": Batch, "description": "Running items stop at their next denoising step."},
        **problem_responses(
            *READ, 409, described={409: "The batch has already ended (`batch_already_finished`)."}
        ),
    },
)
async def cancel_batch(
    batch_id: BatchId, state: StateDep, principal: PrincipalDep, links: LinksDep
) -> Response:
    """Queued items → canceled at once; running ones → stop at their next step (202 until they have).
    A batch that has already ended → 409 ``batch_already_finished``."""
    batch = await service.cancel(state, principal, batch_id, links=links)
    return _batch_response(batch, 200 if batch.status.is_terminal else 202)
