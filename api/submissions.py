"""Checks every kind of submission makes the same way (single jobs and batches)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, cast

from pydantic import BaseModel

from api.errors import ApiError, ServiceUnavailable, UnprocessableRequest
from api.state import AppState, ModelLine
from schemas.problems import FieldError
from services.admission import Admission, IdempotencyClaim
from services.rate_limit import retry_after_s
from services.settings import Settings
from services.ssrf import UnsafeURLError, vet_url


def fingerprint(body: BaseModel) -> str:
    """Canonical hash of the validated request, to compare idempotent replays.

    Taken over the body *with its defaults filled in*: a generated client spells out every default and
    ``curl`` sends three fields, and both mean the same request, so a retry of either under one
    Idempotency-Key is a replay, not a reuse. It is taken *before* anything the server decides for the
    request (a random seed, the default model, the size an aspect ratio stands for): a body without a
    seed stays itself on replay, and is not the same request as one that names a seed.
    """
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def scoped_idempotency_key(prefix: str, principal: str, key: str) -> str:
    """The Redis key for a client's Idempotency-Key, scoped to its API key: two clients may pick the same
    Idempotency-Key independently."""
    return prefix + hashlib.sha256(f"{principal}\x00{key}".encode()).hexdigest()


def idempotency_claim(
    state: AppState, prefix: str, principal: str, key: str, body: BaseModel, created: dict[str, str]
) -> IdempotencyClaim:
    """The claim the admission script stores for ``key`` if it is new: what it names (``created``) and
    the body's fingerprint, so a replay with another body can be told apart."""
    return IdempotencyClaim(
        key=scoped_idempotency_key(prefix, principal, key),
        created=created,
        fingerprint=fingerprint(body),
        ttl=state.settings.idempotency_ttl,
    )


def model_not_found(
    state: AppState, model: str, field: str = "model", default_alias: str | None = None
) -> UnprocessableRequest:
    served = ", ".join(map(repr, state.lines))
    alias = f", or {default_alias!r} for the default" if default_alias else ""
    message = f"model {model!r} is not served here; served: {served}{alias} (GET /v1/models), or omit it"
    return UnprocessableRequest(
        message,
        code="model_not_found",
        errors=[FieldError(field=field, message=message, type="model_not_found")],
    )


def served_line(state: AppState, model: str | None, field: str = "model") -> ModelLine:
    """The queues of the model a submission names (None: the default model); 422 for one not served."""
    try:
        return state.line(model)
    except KeyError:
        raise model_not_found(state, str(model), field) from None


def _webhook_problem(code: str, message: str) -> UnprocessableRequest:
    return UnprocessableRequest(
        message, code=code, errors=[FieldError(field="webhook_url", message=message, type=code)]
    )


def vetted_webhook(settings: Settings, url: Any, events: Sequence[str]) -> dict[str, Any] | None:
    """The webhook to store, after the SSRF check — which resolves the host, so call it off the event
    loop. ``None`` when the submission has no ``webhook_url``."""
    if url is None:
        return None
    if settings.webhook_secret is None:
        raise _webhook_problem(
            "webhooks_not_configured",
            "this server has no DARKROOM_WEBHOOK_SECRET, so it cannot sign webhooks",
        )
    target = str(url)
    try:
        vet_url(target, allow_private=settings.webhook_allow_private, allow_http=settings.webhook_allow_http)
    except UnsafeURLError as exc:
        raise _webhook_problem("webhook_url_not_allowed", f"webhook_url refused: {exc}") from None
    return {"url": target, "events": list(events)}


def replayed(admission: Admission, claim: IdempotencyClaim | None) -> dict[str, Any]:
    """The entry a replayed Idempotency-Key points at (``{"job_id"}`` or ``{"batch_id"}``); 422
    ``idempotency_key_reused`` when the key was used with another body."""
    existing = cast(dict[str, Any], admission.existing)
    if claim is None or existing.get("fingerprint") != claim.fingerprint:
        raise UnprocessableRequest(
            "this Idempotency-Key was already used with a different request body",
            code="idempotency_key_reused",
        )
    return existing


def refusal(settings: Settings, admission: Admission, queue_full_detail: str, share: int = 0) -> ApiError:
    """The answer to a refused admission: 503 ``queue_full`` (``queue_full_detail`` says which queue and
    why), 429 ``queue_share_exceeded`` (the key holds ``share`` of its places) or 429 ``rate_limited``,
    each with its ``Retry-After``."""
    if admission.outcome == "share_exceeded":
        wait_s = max(1, int(settings.queue_full_retry_after.total_seconds()))
        return ApiError(
            f"this API key has {admission.value} jobs waiting on this queue and may hold {share} "
            f"(DARKROOM_QUEUE_SHARE_PER_KEY of its ceiling); retry once some have run",
            status=429,
            code="queue_share_exceeded",
            headers={"Retry-After": str(wait_s)},
        )
    if admission.outcome == "queue_full":
        return ServiceUnavailable(
            queue_full_detail,
            code="queue_full",
            retry_after=max(1, int(settings.queue_full_retry_after.total_seconds())),
        )
    wait_s = retry_after_s(admission.value)
    return ApiError(
        f"too many submissions for this API key; retry in {wait_s} s",
        status=429,
        code="rate_limited",
        headers={"Retry-After": str(wait_s)},
    )
