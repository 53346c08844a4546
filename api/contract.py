"""What the OpenAPI document promises: each operation's error responses, its security, and the document's
finishing touches that FastAPI does not write itself.

Clients are generated from this document (``docs/openapi.json``), so it states only what can happen:
an operation lists the error statuses it can answer, each as RFC 9457 problem details, and nothing else
(FastAPI's blanket 422 in its own ``HTTPValidationError`` shape, which we never send, is dropped from
operations that cannot fail validation). Whether an operation needs an API key comes from the same
:func:`api.auth.is_open_path` the middleware enforces, so the two cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from api.auth import BEARER_SCHEME, is_open_path
from api.errors import status_title
from schemas.events import STREAM_EVENT_DATA
from schemas.problems import PROBLEM_CONTENT_TYPE, Problem

_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}

#: On a job that has not ended (202 of a submission, 200 of a read): when polling again is worth it.
POLL_HINT = {
    "Retry-After": {
        "description": "While the job is queued or running: seconds until a poll is worth making (an "
        "integer). Queued: the time its place in line takes at the queue's recent pace, 1 to 30. "
        "Running: its remaining steps at its pace so far, 1 to 5. Absent once the job has ended. A "
        "hint: reading sooner is allowed, it only costs a read.",
        "schema": {"type": "integer", "minimum": 1, "maximum": 30},
    }
}

# What each error status means on this API, with the codes a client can branch on.
_MEANINGS: dict[int, tuple[str, dict[str, Any]]] = {
    401: (
        "No API key, or an unknown one (`unauthorized`): send `Authorization: Bearer <key>`.",
        {"WWW-Authenticate": {"description": "Always `Bearer`.", "schema": {"type": "string"}}},
    ),
    404: ("No such resource, or it is no longer retained (`not_found`).", {}),
    409: ("The request conflicts with the resource's state.", {}),
    413: ("The body is larger than the API accepts (`payload_too_large`).", {}),
    415: ("The body is not JSON (`unsupported_media_type`): send `Content-Type: application/json`.", {}),
    416: (
        "The range starts past the resource's end (`range_not_satisfiable`).",
        {
            "Content-Range": {
                "description": "`bytes */<size>`: the resource's size.",
                "schema": {"type": "string"},
            }
        },
    ),
    422: ("Validation error (`validation_error`, `malformed_json`) or a rule violation.", {}),
    429: (
        "Too many requests for this API key (`rate_limited`), or it holds its share of the queue "
        "(`queue_share_exceeded`).",
        _RETRY_AFTER,
    ),
    500: ("A bug on the server's side (`internal_error`); the detail quotes the request id.", {}),
    503: (
        "A dependency is unreachable (`redis_unavailable`, `storage_unavailable`), Redis is full "
        "(`redis_out_of_memory`) or the queue is full (`queue_full`).",
        _RETRY_AFTER,
    ),
}

TOO_MANY_WAITS = (
    "the API key already holds its share of open waits (`too_many_waits`: SSE streams, `Prefer: wait` "
    "submissions and OpenAI image calls together, DARKROOM_MAX_WAITS_PER_KEY); retry after Retry-After "
    "or poll the job instead"
)
SERVER_BUSY = "this server holds all the open waits it may (`server_busy`, DARKROOM_MAX_WAITS)"
WAITS: dict[int, str] = {
    429: f"Waiting refused: {TOO_MANY_WAITS}.",
    503: f"A dependency is unreachable (`redis_unavailable`), or {SERVER_BUSY}.",
}
"""Statuses of the operations that hold a request open while a job runs (SSE, ``Prefer: wait``, OpenAI)."""

READ = (401, 404, 500, 503)
"""Reading or acting on one resource by id, with an API key."""
SUBMIT = (401, 413, 415, 422, 429, 500, 503)
"""Submitting a JSON body that is validated and queued."""
LIMITED_READ = (401, 404, 429, 500, 503)
"""Reading one resource by id under the key's read rate limit (``api.limits.read_token``, or its rider)."""


def problem_responses(
    *statuses: int, model: type[BaseModel] = Problem, described: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for the error statuses an operation can answer, as problem+json.

    ``model`` is the body's schema (OpenAI-compatible routes add OpenAI's ``error`` member);
    ``described`` replaces a status's generic text where the operation can say more.
    """
    entries: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        meaning, headers = _MEANINGS.get(status, (status_title(status), {}))
        entry: dict[str, Any] = {
            # "model" makes FastAPI register the schema (under application/json); the empty problem+json
            # entry marks it for _finish to move the schema to the media type we send.
            "model": model,
            "description": (described or {}).get(status, meaning),
            "content": {PROBLEM_CONTENT_TYPE: {}},
        }
        if headers:
            entry["headers"] = dict(headers)
        entries[status] = entry
    return entries


STREAM_EVENT_SCHEMA = "GenerationStreamEvent"
STREAM_EVENT_DOC = (
    "One frame of GET /v1/generations/{job_id}/events: `event` names it, `id` is its stream position "
    "(send it as Last-Event-ID to resume after it) and `data` is one line of JSON whose schema depends on "
    "`event`: `status` → StatusChange, `progress` → Progress, `job` → Job (the last frame)."
)


def event_stream_response(description: str) -> dict[str, Any]:
    r"""A 200 ``text/event-stream`` response whose frames are ``GenerationStreamEvent``\ s.

    OpenAPI 3.1 lets ``schema`` describe each event of an event stream (3.2 moves that to ``itemSchema``),
    as an object with the SSE fields; ``data`` is a string whose JSON content is given by the standard
    ``contentMediaType``/``contentSchema`` pair, which schemathesis checks on every event it reads.
    """
    return {
        "description": description,
        "content": {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{STREAM_EVENT_SCHEMA}"}}},
    }


def _stream_event_schema() -> dict[str, Any]:
    frames = [
        {
            "type": "object",
            "title": f"{event.capitalize()}StreamEvent",
            "required": ["event", "id", "data"],
            "properties": {
                "event": {"const": event, "type": "string"},
                "id": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": f"#/components/schemas/{model.__name__}"},
                },
            },
        }
        for event, model in STREAM_EVENT_DATA.items()
    ]
    return {"description": STREAM_EVENT_DOC, "oneOf": frames}


def install_contract(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the finished document. Call once, after every route is added."""
    app.openapi = _finished(app.openapi)  # type: ignore[method-assign]


def _finished(generate: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Wrap ``app.openapi``; idempotent, so FastAPI's caching of the document is unaffected."""

    def openapi() -> dict[str, Any]:
        document = generate()
        for model in STREAM_EVENT_DATA.values():
            add_component_schema(document, model)
        document["components"]["schemas"][STREAM_EVENT_SCHEMA] = _stream_event_schema()
        for path, path_item in document.get("paths", {}).items():
            for operation in path_item.values():
                if isinstance(operation, dict):
                    _finish(path, operation)
        # Declared here too: a route that only the middleware guards (GET /v1/models) names no Security
        # dependency, and an app may have no route that does.
        document.setdefault("components", {}).setdefault("securitySchemes", {}).setdefault(
            BEARER_SCHEME,
            {"type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer <key>`."},
        )
        _drop_unused_validation_schemas(document)
        _integral_bounds(document.get("components", {}).get("schemas", {}))
        return document

    return openapi


def _finish(path: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.get("responses", {})
    for status in list(responses):
        content = responses[status].get("content") or {}
        problem = content.get(PROBLEM_CONTENT_TYPE)
        if problem is not None and "schema" not in problem and "application/json" in content:
            problem["schema"] = content.pop("application/json")["schema"]
        elif status == "422" and "HTTPValidationError" in json.dumps(content):
            del responses[status]  # FastAPI's default: this operation declared no 422 of its own
    operation["security"] = [] if is_open_path(path) else [{BEARER_SCHEME: []}]


def add_component_schema(document: dict[str, Any], model: type[BaseModel]) -> None:
    """Add a model that no route names as a body (an SSE event's ``data``, a webhook payload) to the
    components, as the server sends it (serialization mode); schemas already there are kept."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    if model.__name__ in schemas:
        return
    schema = model.model_json_schema(mode="serialization", ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas[model.__name__] = schema


def _drop_unused_validation_schemas(document: dict[str, Any]) -> None:
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # the second is used by the first
        if f'"#/components/schemas/{name}"' not in json.dumps(document):
            schemas.pop(name, None)


def _integral_bounds(node: Any) -> None:
    """FastAPI's schema model holds ``minimum``/``maximum`` as floats (``4294967295.0``): write the
    integral ones as integers, as the models declare them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") and (
                isinstance(value, float) and value.is_integer()
            ):
                node[key] = int(value)
            else:
                _integral_bounds(value)
    elif isinstance(node, list):
        for item in node:
            _integral_bounds(item)
