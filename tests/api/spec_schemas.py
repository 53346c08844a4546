"""Validate JSON against a schema of the committed docs/openapi.json, as an outsider's tool would: the
spec's own ``$ref``\\ s resolved within the document, JSON Schema 2020-12 (OpenAPI 3.1's dialect)."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from api.openapi import DEFAULT_PATH

SPEC_URI = "urn:darkroom:openapi"


@cache
def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(DEFAULT_PATH.read_text(encoding="utf-8"))
    return spec


@cache
def _registry() -> Registry[Any]:
    return Registry().with_resource(
        SPEC_URI, Resource.from_contents(_spec(), default_specification=DRAFT202012)
    )


def spec_errors(schema_name: str, instance: Any) -> list[str]:
    """Why ``instance`` does not match ``components/schemas/<schema_name>`` (empty: it matches)."""
    validator = Draft202012Validator(
        {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}, registry=_registry()
    )
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(instance)
    ]


def stream_event_errors(event: str, event_id: str | None, data: str) -> list[str]:
    """Why an SSE frame does not match the spec's GenerationStreamEvent, its JSON ``data`` included (which
    the spec gives as ``contentSchema``, a keyword validators only annotate)."""
    frame = {"event": event, "id": event_id, "data": data}
    errors = spec_errors("GenerationStreamEvent", frame)
    for branch in _spec()["components"]["schemas"]["GenerationStreamEvent"]["oneOf"]:
        if branch["properties"]["event"]["const"] == event:
            model = branch["properties"]["data"]["contentSchema"]["$ref"].rsplit("/", 1)[1]
            errors += spec_errors(model, json.loads(data))
    return errors
