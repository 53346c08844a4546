"""``GET /v1/models``: the models this API accepts, and how many workers stand ready for each.

Shaped like OpenAI's model list, so ``client.models.list()`` / ``retrieve()`` of the official SDK work;
each entry adds the fleet's figures — ready workers (``services/fleet.py``) and the depth of the model's
two queues — which is what a client needs to tell "slow" from "nobody serves this right now".
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path

from api.contract import READ, problem_responses
from api.deps import StateDep
from api.errors import NotFound
from api.state import AppState
from schemas.models import MODEL_NAME_PATTERN, ModelList, ServedModel
from services import fleet

router = APIRouter(prefix="/v1/models", tags=["models"])


def _owner(model: str) -> str:
    return model.split("/", 1)[0] if "/" in model else "darkroom"


async def _queue_depths(state: AppState, models: list[str]) -> list[int]:
    """LLEN of each model's generation then batch queue, in one round trip."""
    async with state.redis_async.pipeline(transaction=False) as pipe:
        for model in models:
            line = state.lines[model]
            pipe.llen(line.queue.key)
            pipe.llen(line.batch_queue.key)
        depths: list[Any] = await pipe.execute()
    return [int(depth) for depth in depths]


async def served_models(state: AppState, models: list[str]) -> list[ServedModel]:
    ready, seen, depths = await asyncio.gather(
        fleet.ready_counts(state.redis_async, models),
        fleet.first_seen(state.redis_async, models),
        _queue_depths(state, models),
    )
    return [
        ServedModel(
            id=model,
            created=seen[model] or 0,
            owned_by=_owner(model),
            default=model == state.settings.served_model,
            ready_workers=ready[model],
            queued=depths[2 * index],
            batch_queued=depths[2 * index + 1],
        )
        for index, model in enumerate(models)
    ]


@router.get(
    "",
    response_model=ModelList,
    summary="List the served models and their ready workers",
    operation_id="listModels",
    responses=problem_responses(401, 500, 503),
)
async def list_models(state: StateDep) -> ModelList:
    """Every model requests may name as ``model`` (the default first), with its ready workers and queues."""
    return ModelList(data=await served_models(state, list(state.lines)))


@router.get(
    "/{model:path}",
    response_model=ServedModel,
    summary="Read one served model",
    operation_id="retrieveModel",
    responses=problem_responses(
        *READ, 422, described={404: "The model is not served here (`model_not_found`)."}
    ),
)
async def retrieve_model(
    model: Annotated[
        str, Path(pattern=MODEL_NAME_PATTERN, description="A model name (hub ids keep their '/').")
    ],
    state: StateDep,
) -> ServedModel:
    """One model by its name; a hub id keeps its slash (``/v1/models/OWNER/NAME``)."""
    if model not in state.lines:
        raise NotFound(
            f"model {model!r} is not served here (GET /v1/models lists them)", code="model_not_found"
        )
    (served,) = await served_models(state, [model])
    return served
