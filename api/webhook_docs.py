"""The OpenAPI ``webhooks`` section: every event a receiver can be sent, its body and its headers.

Documentation only — nothing here is served: ``app.webhooks`` is FastAPI's router for operations *we*
call on the receiver's URL. One operation per event of the vocabulary (``schemas.webhooks``), its body
the event's payload model (``schemas.webhook_payloads``), so a receiver can generate its handler from
the spec, and ``tests/api/test_webhook_docs.py`` checks real deliveries against these schemas.

The responses are the ones the delivery worker acts on (``services.webhooks.retry``), not a menu for the
receiver to fill in: any 2xx is delivered; 410 stops this and every later event of the job or batch; 408,
429 and 5xx are retried with backoff (``Retry-After`` honoured); any other status, and a redirect, fails
the message without retry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Header, Response
from pydantic import BaseModel

from api.contract import add_component_schema
from schemas.webhook_payloads import PAYLOADS
from schemas.webhooks import WebhookEvent

TAG = "webhooks"

_WHEN: dict[WebhookEvent, str] = {
    WebhookEvent.GENERATION_STARTED: "Sent when a worker takes the job (once per run: a job handed to "
    "another worker after its first one was lost starts again).",
    WebhookEvent.GENERATION_PROGRESS: "Sent while the job runs, after a denoising step, at most once a "
    "second per job.",
    WebhookEvent.GENERATION_SUCCEEDED: "Sent once when the job ends with its images.",
    WebhookEvent.GENERATION_FAILED: "Sent once when the job ends without its images; `data.error.type` "
    "says why.",
    WebhookEvent.GENERATION_CANCELED: "Sent once when the job ends on a cancel request (its own, or its "
    "batch's).",
    WebhookEvent.BATCH_COMPLETED: "Sent once when a batch's last item ends (succeeded, failed or "
    "canceled). Subscribe on `POST /v1/batches`; read the items with `GET /v1/batches/{batch_id}`.",
}

_SUBSCRIBE = (
    "Subscribe with `webhook_events` on `POST /v1/generations` (the `generation.*` events) or "
    "`POST /v1/batches` (all six; the `generation.*` ones apply to every item). Verify the signature over "
    "the raw body before parsing it (any Standard Webhooks library does), and deduplicate on "
    "`webhook-id`: delivery is at least once."
)

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds or an HTTP date: when to try again (capped at an hour).",
        "schema": {"type": "string"},
    }
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    410: {"description": "Gone: stop. Not retried, and no later event of this job or batch is sent."},
    408: {"description": "Retried with backoff."},
    429: {
        "description": "Retried, after `Retry-After` if given, else with backoff.",
        "headers": _RETRY_AFTER,
    },
    "4XX": {"description": "Any other 4xx (and a 3xx: redirects are not followed): failed, not retried."},
    "5XX": {
        "description": "Retried, after `Retry-After` if given, else with backoff.",
        "headers": _RETRY_AFTER,
    },
}


def _signature_headers(
    webhook_id: Annotated[
        str,
        Header(
            description="The message id: the same on every retry of one event, so deduplicate on it.",
            examples=["msg_2b4f0c7d9e1a4b6c8d0e2f4a6b8c0d1e"],
        ),
    ],
    webhook_timestamp: Annotated[
        int,
        Header(
            description="Seconds since the epoch when this attempt was signed (fresh per attempt); "
            "refuse messages too far from your clock to stop replays.",
        ),
    ],
    webhook_signature: Annotated[
        str,
        Header(
            description="Space-separated `v1,<base64 HMAC-SHA256>` of `{webhook-id}.{webhook-timestamp}."
            "{raw body}`, keyed with the base64 part of the `whsec_` secret (several during a key "
            "rotation; accept the message if any matches).",
        ),
    ],
) -> None:
    """The Standard Webhooks headers every delivery carries (documented as header parameters)."""


def _receiver(event: WebhookEvent) -> Callable[..., None]:
    """A stand-in endpoint whose signature FastAPI reads for the signature headers. Never called. The
    body is declared by reference (``_body``), not as a parameter: FastAPI would describe a parameter in
    validation mode, giving Job and its parts a second, "-Input" schema with every default optional."""

    def receive(**_: Any) -> None:
        return None

    headers = [
        parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for parameter in inspect.signature(_signature_headers, eval_str=True).parameters.values()
    ]
    receive.__signature__ = inspect.Signature(headers)  # type: ignore[attr-defined]
    receive.__name__ = f"receive_{event.value.replace('.', '_')}"
    return receive


def _body(payload: type[BaseModel]) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{payload.__name__}"}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _operation_id(event: WebhookEvent) -> str:
    """``generation.succeeded`` -> ``onGenerationSucceeded`` (unique, URL-safe)."""
    subject, action = event.value.split(".")
    return f"on{subject.capitalize()}{action.capitalize()}"


def install_webhook_docs(app: FastAPI) -> None:
    """Declare one webhook operation per event on ``app.webhooks`` (the spec's ``webhooks`` section)."""
    for event, payload in PAYLOADS.items():
        app.webhooks.add_api_route(
            event.value,
            _receiver(event),
            methods=["POST"],
            operation_id=_operation_id(event),
            summary=f"The {event.value} event",
            description=f"{_WHEN[event]}\n\n{_SUBSCRIBE}",
            tags=[TAG],
            status_code=200,
            response_class=Response,
            response_description="Delivered: any 2xx status counts; the response body is ignored.",
            responses=_RESPONSES,
            # No security scheme: a receiver authenticates us by the signature headers, which OpenAPI
            # cannot express as a scheme. Explicitly empty, so a root-level API-key requirement (how
            # clients call us) is not read as applying to our calls; Redocly's security-defined rule,
            # which walks webhooks too, is satisfied either way.
            openapi_extra={"security": [], "requestBody": _body(payload)},
        )
    app.openapi = _finished(app.openapi)  # type: ignore[method-assign]


def _finished(generate: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Add the payload schemas (as sent) to the components, and drop the ``content`` FastAPI gives every
    declared response: we read only the status of a receiver's answer (and ``Retry-After``), never its
    body. Idempotent (FastAPI caches the document)."""

    def openapi() -> dict[str, Any]:
        document = generate()
        for payload in PAYLOADS.values():
            add_component_schema(document, payload)
        for path_item in document.get("webhooks", {}).values():
            for operation in path_item.values():
                for response in operation.get("responses", {}).values():
                    response.pop("content", None)
        return document

    return openapi
