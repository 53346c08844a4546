"""The base of every body the API sends in full.

A response field with a default is still always sent, so its JSON schema must list it as required:
otherwise every generated client (openapi-python-client, openapi-typescript) types it as "maybe absent"
and makes each caller check ``images``, ``warnings`` or ``error`` for a value that is always there.
Pydantic writes serialization-mode schemas that way with ``json_schema_serialization_defaults_required``;
validation-mode (request) schemas are unaffected, so request defaults stay optional.

A body dumped with ``exclude_none`` (RFC 9457 problems, OpenAI's ``ImageData``) must *not* use this base:
its ``None`` fields really are absent.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

SENT_IN_FULL = ConfigDict(json_schema_serialization_defaults_required=True)
"""The config for a request model that a response echoes back (``GenerationRequest``, as a job's normalised
``request``): merge it into the model's own config — but only where the model appears in responses *alone*.
A model in both a request body and a response gets two schemas (``X-Input``/``X-Output``) with one title,
and generators that name models by title (openapi-python-client) refuse the clash; so the nested request
parts (``LoraRequest``, ``SkipLayerGuidance``, ``Outpaint``) keep their defaults optional."""


class ResponseModel(BaseModel):
    """A response body, or part of one, that the server always sends with every field present."""

    model_config = SENT_IN_FULL
