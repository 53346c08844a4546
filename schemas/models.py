"""Served models: the names requests may give as ``model``, and ``GET /v1/models``' answer.

The list is shaped like OpenAI's (``{"object": "list", "data": [{"id", "object": "model", "created",
"owned_by"}]}``), so ``client.models.list()`` of the official SDK reads it, with darkroom's fleet figures
added to each entry.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import ResponseModel

#: What a served model may be called (requests' ``model``, queue names): a hub id fits, commas never do.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"


class ServedModel(ResponseModel):
    id: str = Field(description="The name to give as `model` in requests.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time a worker first served this model here (0: none has yet).")
    owned_by: str = Field(description="The hub organisation of the model id, else 'darkroom'.")
    default: bool = Field(description="Requests that name no model get this one.")
    ready_workers: int = Field(
        description="Workers holding this model, loaded and warm, that announced themselves within the "
        "last DARKROOM_LOST_AFTER. 0: jobs for it wait in its queue until one starts."
    )
    queued: int = Field(description="Interactive jobs waiting for it.")
    batch_queued: int = Field(description="Batch items waiting for it (served after interactive jobs).")


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ServedModel] = Field(description="Every model this API accepts, the default first.")
