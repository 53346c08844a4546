"""RFC 9457 problem details: the one error shape every 4xx/5xx answer has.

``type`` is a stable machine code under our own URI space, so clients can branch on it without parsing
prose; ``errors`` lists field-level causes for validation problems.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

# A URN: stable and never mistaken for a page to fetch (RFC 9457 allows non-resolvable type URIs).
PROBLEM_TYPE_BASE = "urn:darkroom:problem:"
PROBLEM_CONTENT_TYPE = "application/problem+json"


def problem_type(code: str) -> str:
    return PROBLEM_TYPE_BASE + code


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. 'width' or 'webhook_url'.")
    message: str
    type: str


class Problem(BaseModel):
    type: str = Field(description="URI identifying the problem kind; its last segment is the stable code.")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    code: str = Field(description="The stable machine code (same as the last segment of type).")
    errors: list[FieldError] | None = None
