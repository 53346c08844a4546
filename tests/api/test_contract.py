"""``api.contract`` on a small app of its own: declared errors become problem+json, FastAPI's blanket 422
goes, security follows the auth middleware's open paths, and integral bounds stay integers."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from api.contract import READ, install_contract, problem_responses
from schemas.problems import PROBLEM_CONTENT_TYPE

PROBLEM = {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}


class Item(BaseModel):
    width: int = Field(ge=64, le=2048)


def build_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/items", responses=problem_responses(401, 422, described={422: "Bad item."}))
    async def create_item(item: Item) -> dict[str, Any]:
        return item.model_dump()

    @app.get("/v1/items/{item_id}", responses=problem_responses(*READ))
    async def get_item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    install_contract(app)
    return app


def test_declared_errors_are_problem_json_and_nothing_else_is_declared() -> None:
    document = build_app().openapi()
    create = document["paths"]["/v1/items"]["post"]["responses"]
    assert sorted(create) == ["200", "401", "422"]
    assert create["401"]["content"] == PROBLEM and "WWW-Authenticate" in create["401"]["headers"]
    assert create["422"]["description"] == "Bad item."
    read = document["paths"]["/v1/items/{item_id}"]["get"]["responses"]
    # A str path parameter cannot fail validation: FastAPI's default 422 is not declared.
    assert sorted(read) == ["200", "401", "404", "500", "503"]
    assert "Retry-After" in read["503"]["headers"]
    assert all(read[status]["content"] == PROBLEM for status in ("401", "404", "500", "503"))
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert "FieldError" in schemas


def test_security_follows_the_open_paths_of_the_auth_middleware() -> None:
    document = build_app().openapi()
    paths = document["paths"]
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert paths["/v1/items"]["post"]["security"] == [{"HTTPBearer": []}]
    assert paths["/healthz"]["get"]["security"] == []


def test_bounds_are_integers_and_the_document_is_cached() -> None:
    app = build_app()
    document = app.openapi()
    width = document["components"]["schemas"]["Item"]["properties"]["width"]
    assert (width["minimum"], width["maximum"]) == (64, 2048)
    assert all(type(width[key]) is int for key in ("minimum", "maximum"))
    assert app.openapi() is document
