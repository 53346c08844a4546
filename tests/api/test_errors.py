"""Every failure path answers RFC 9457 problem+json, checked over real HTTP against uvicorn.

The app below is built here, not imported from ``api.main``: it has one route per error kind, so the
tests pin the contract of ``api.errors`` independently of the real routes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio
import redis.exceptions
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from api.errors import (
    ApiError,
    Conflict,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnprocessableRequest,
    install_error_handlers,
)
from api.middleware import BodySizeLimitMiddleware, MetricsMiddleware, RequestContextMiddleware
from devtools.net import free_port
from schemas.problems import PROBLEM_CONTENT_TYPE, Problem, problem_type
from tests.api import LogCapture, capture_json_logs, serve

MAX_BODY = 1024
LEAKED_TEXT = "cannot reach db.internal:5432 as admin"


class Item(BaseModel):
    width: int = Field(ge=64, le=2048)
    scale: float = Field(1.0, ge=0, le=20, allow_inf_nan=False)
    name: str = "item"


def build_app(closed_port: int) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_BODY)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestContextMiddleware)

    @app.post("/items")
    async def create_item(item: Item) -> dict[str, Any]:
        return item.model_dump()

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, int]:
        if item_id == 404:
            raise NotFound(f"No item {item_id}.")
        return {"id": item_id}

    @app.post("/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> None:
        raise Conflict(f"Job {job_id} already finished.", code="job_already_finished")

    @app.post("/idempotent")
    async def idempotent() -> None:
        raise UnprocessableRequest(
            "Idempotency-Key was used with another body.", code="idempotency_key_reused"
        )

    @app.get("/busy")
    async def busy() -> None:
        raise ServiceUnavailable("The queue is full.", retry_after=7)

    @app.get("/private")
    async def private() -> None:
        raise Unauthorized("Missing API key.")

    @app.get("/forbidden")
    async def forbidden() -> None:
        raise HTTPException(status_code=403, detail="Not for you.")

    @app.get("/redis/down")
    async def redis_down() -> None:
        # No retries: the outage should surface at once, not after redis-py's backoff schedule.
        client = redis.asyncio.Redis(
            host="127.0.0.1", port=closed_port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            await client.ping()
        finally:
            await client.aclose()

    @app.get("/redis/loading")
    async def redis_loading() -> None:
        raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")

    @app.get("/redis/timeout")
    def redis_timeout() -> None:
        raise redis.exceptions.TimeoutError("Timeout reading from 10.0.0.7:6379")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(LEAKED_TEXT)

    @app.get("/boom-sync")
    def boom_sync() -> None:  # runs in the threadpool: the exception crosses a thread boundary
        raise KeyError(LEAKED_TEXT)

    return app


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return build_app(free_port())


@pytest.fixture(scope="module")
def logs() -> Iterator[LogCapture]:
    with capture_json_logs() as capture:
        yield capture


@pytest.fixture(scope="module")
def client(app: FastAPI, logs: LogCapture) -> Iterator[httpx.Client]:
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        yield c


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is a problem+json document of ``status``/``code`` whose body parses as ``Problem``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    body: dict[str, Any] = response.json()
    Problem.model_validate(body)
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == problem_type(code)
    assert body["instance"] == response.request.url.path
    assert body["title"]
    return body


# --- routing errors ----------------------------------------------------------------------------------------


def test_unknown_route_is_404_problem(client: httpx.Client) -> None:
    body = assert_problem(client.get("/no/such/thing"), 404, "not_found")
    assert body["title"] == "Not Found"
    assert "/no/such/thing" in body["detail"]


def test_wrong_method_is_405_problem_keeping_allow(client: httpx.Client) -> None:
    response = client.delete("/items")
    body = assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert "DELETE" in body["detail"]


def test_route_http_exception_keeps_its_detail(client: httpx.Client) -> None:
    body = assert_problem(client.get("/forbidden"), 403, "forbidden")
    assert body["detail"] == "Not for you."


# --- validation --------------------------------------------------------------------------------------------


def test_validation_error_lists_fields_without_body_prefix(client: httpx.Client) -> None:
    body = assert_problem(client.post("/items", json={"width": "wide", "scale": 99}), 422, "validation_error")
    fields = {e["field"]: e for e in body["errors"]}
    assert set(fields) == {"width", "scale"}
    assert fields["width"]["type"] == "int_parsing"
    assert fields["scale"]["type"] == "less_than_equal"
    assert "width" in body["detail"] and "scale" in body["detail"]


def test_missing_field(client: httpx.Client) -> None:
    body = assert_problem(client.post("/items", json={}), 422, "validation_error")
    assert body["errors"] == [{"field": "width", "message": "Field required", "type": "missing"}]


def test_path_parameter_error_names_its_location(client: httpx.Client) -> None:
    body = assert_problem(client.get("/items/not-a-number"), 422, "validation_error")
    assert body["errors"][0]["field"] == "path.item_id"


def test_validation_never_echoes_input(client: httpx.Client) -> None:
    response = client.post("/items", json={"width": "secret-value-123"})
    assert_problem(response, 422, "validation_error")
    assert "secret-value-123" not in response.text


def test_malformed_json(client: httpx.Client) -> None:
    response = client.post("/items", content=b'{"width": ', headers={"content-type": "application/json"})
    body = assert_problem(response, 422, "malformed_json")
    assert body["detail"].startswith("The request body is not valid JSON")
    assert "errors" not in body


@pytest.mark.parametrize(
    ("content_type", "named"),
    [
        ("application/x-www-form-urlencoded", "Content-Type 'application/x-www-form-urlencoded'"),
        ("text/plain; charset=utf-8", "Content-Type 'text/plain'"),
        (None, "no Content-Type"),
    ],
)
def test_a_json_body_not_declared_json_is_415_naming_both_media_types(
    client: httpx.Client, content_type: str | None, named: str
) -> None:
    """curl's ``-d`` sends a form's Content-Type: the answer says so, instead of "a valid dictionary"."""
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/items", content=b'{"width": 512}', headers=headers)
    body = assert_problem(response, 415, "unsupported_media_type")
    assert named in body["detail"] and "application/json" in body["detail"]
    assert response.headers["accept-post"] == "application/json"
    assert "dictionary" not in response.text


def test_json_media_types_and_an_empty_body_keep_their_answers(client: httpx.Client) -> None:
    typed = client.post(
        "/items", content=b'{"width": 512}', headers={"content-type": "application/vnd.x+json"}
    )
    assert typed.status_code == 200
    assert_problem(client.post("/items"), 422, "validation_error")  # no body at all: the body is missing


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literals_are_client_errors(client: httpx.Client, literal: str) -> None:
    """Python's json accepts these; the model refuses them, and the handler must not choke on them
    (FastAPI's default handler echoes the input and fails encoding NaN → 500)."""
    raw = f'{{"width": 512, "scale": {literal}}}'.encode()
    response = client.post("/items", content=raw, headers={"content-type": "application/json"})
    body = assert_problem(response, 422, "validation_error")
    assert body["errors"][0]["field"] == "scale"


def test_invalid_utf8_is_malformed_json(client: httpx.Client) -> None:
    raw = b'{"width": 512, "name": "\xff\xfe"}'
    response = client.post("/items", content=raw, headers={"content-type": "application/json"})
    body = assert_problem(response, 422, "malformed_json")
    assert "UTF-8" in body["detail"]


# --- body size ---------------------------------------------------------------------------------------------


def test_declared_oversized_body_is_413_problem(client: httpx.Client) -> None:
    raw = b'{"name": "' + b"x" * (MAX_BODY * 4) + b'"}'
    response = client.post("/items", content=raw, headers={"content-type": "application/json"})
    body = assert_problem(response, 413, "payload_too_large")
    assert str(MAX_BODY) in body["detail"]
    assert response.headers["connection"] == "close"


def test_chunked_oversized_body_is_413_problem(client: httpx.Client) -> None:
    chunks = [b'{"name": "'] + [b"x" * 512] * 8 + [b'"}']
    response = client.post("/items", content=iter(chunks), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers  # really streamed, no length declared
    body = assert_problem(response, 413, "payload_too_large")
    assert str(MAX_BODY) in body["detail"]


def test_body_at_the_limit_is_accepted(client: httpx.Client) -> None:
    prefix, suffix = b'{"width": 512, "name": "', b'"}'
    raw = prefix + b"x" * (MAX_BODY - len(prefix) - len(suffix)) + suffix
    assert len(raw) == MAX_BODY
    response = client.post("/items", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


# --- ApiError subclasses -----------------------------------------------------------------------------------


def test_not_found_api_error(client: httpx.Client) -> None:
    body = assert_problem(client.get("/items/404"), 404, "not_found")
    assert body["detail"] == "No item 404."


def test_conflict_with_specific_code(client: httpx.Client) -> None:
    body = assert_problem(client.post("/jobs/job_1/cancel"), 409, "job_already_finished")
    assert body["title"] == "Conflict"
    assert body["detail"] == "Job job_1 already finished."


def test_unprocessable_with_specific_code(client: httpx.Client) -> None:
    body = assert_problem(client.post("/idempotent"), 422, "idempotency_key_reused")
    assert body["title"] == "Unprocessable Content"


def test_service_unavailable_carries_retry_after(client: httpx.Client) -> None:
    response = client.get("/busy")
    assert_problem(response, 503, "service_unavailable")
    assert response.headers["retry-after"] == "7"


def test_unauthorized_carries_www_authenticate(client: httpx.Client) -> None:
    response = client.get("/private")
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


# --- infrastructure failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/redis/down", "/redis/loading", "/redis/timeout"])
def test_redis_outage_is_503_with_retry_after(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    body = assert_problem(response, 503, "redis_unavailable")
    assert response.headers["retry-after"] == "1"
    assert "6379" not in response.text and "127.0.0.1" not in response.text
    assert "errors" not in body


@pytest.mark.parametrize("path", ["/boom", "/boom-sync"])
def test_unhandled_exception_is_500_without_leaking(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    body = assert_problem(response, 500, "internal_error")
    assert "db.internal" not in response.text and "admin" not in response.text
    request_id = response.headers["x-request-id"]
    assert request_id in body["detail"]


def test_unhandled_exception_is_logged_once_with_traceback_and_request_id(
    client: httpx.Client, logs: LogCapture
) -> None:
    logs.mark()
    response = client.get("/boom")
    request_id = response.headers["x-request-id"]
    errors = [line for line in logs.lines() if line["level"] == "error"]
    assert len(errors) == 1, errors  # not again by Starlette's ServerErrorMiddleware or uvicorn
    assert errors[0]["request_id"] == request_id
    assert "RuntimeError: cannot reach db.internal" in errors[0]["exception"]  # the log has the details
    access = [line for line in logs.lines() if line["event"] == "http_request"]
    assert [(a["status"], a["route"], a["request_id"]) for a in access] == [(500, "/boom", request_id)]


def test_server_survives_errors(client: httpx.Client) -> None:
    client.get("/boom")
    assert client.get("/items/1").json() == {"id": 1}


# --- unit level --------------------------------------------------------------------------------------------


def test_api_error_defaults_and_overrides() -> None:
    err = Conflict("done", code="job_already_finished")
    assert (err.status, err.code, err.title, err.detail) == (409, "job_already_finished", "Conflict", "done")
    assert Conflict().code == "conflict"  # the instance override does not leak into the class
    problem = PayloadTooLarge("too big").to_problem("/v1/x")
    assert problem.type == problem_type("payload_too_large") and problem.instance == "/v1/x"
    custom = ApiError("teapot", status=418, code="teapot")
    assert (custom.status, custom.title) == (418, "I'm a Teapot")
    assert ServiceUnavailable(retry_after=None).headers == {}
    assert ServiceUnavailable(headers={"X-Queue": "full"}).headers == {"X-Queue": "full", "Retry-After": "1"}
