"""The API's one error vocabulary, and the handlers that render every failure as RFC 9457 problem details.

Clients branch on the stable ``code`` (and ``type`` = ``urn:darkroom:problem:<code>``), never on prose, so
*every* way a request can fail has to produce the same ``application/problem+json`` shape: our own
``ApiError``\\s, FastAPI's request validation, Starlette's routing 404/405, a Redis outage, and plain bugs.
:func:`install_error_handlers` registers one handler per kind; routes just ``raise NotFound(...)``.

Routes declare the statuses they can answer in OpenAPI with ``api.contract.problem_responses``, the way
vLLM declares its ``ErrorResponse`` on every route.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus

import redis.exceptions
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from schemas.openai_images import openai_error
from schemas.problems import PROBLEM_CONTENT_TYPE, FieldError, Problem, problem_type
from services.clients import out_of_memory
from services.storage import StorageUnavailable

log = structlog.get_logger(__name__)

# RFC 9110 names where Python's HTTPStatus still carries the older RFC 7231 wording.
_TITLES: dict[int, str] = {413: "Content Too Large", 422: "Unprocessable Content"}

# Stable codes for the statuses Starlette/FastAPI raise as plain HTTPException.
_HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}

# Pydantic prefixes messages of errors raised inside validators; the prefix is noise to an API client.
_PYDANTIC_PREFIX = re.compile(r"^(Value error|Assertion failed), ")

# A 15 MB body can name a million unknown fields: list only this many, each name cut to this length, so a
# hostile request cannot make the error response (and the work of building it) larger than the request.
MAX_LISTED_ERRORS = 100
MAX_FIELD_NAME_CHARS = 200

OPENAI_COMPATIBLE_PREFIX = "/v1/images/"
"""Paths whose problems also carry OpenAI's ``{"error": {...}}`` member (see :func:`problem_response`)."""

REDIS_RETRY_AFTER_S = 1
"""Retry-After for Redis outages: short, because a restart or failover usually takes seconds."""
REDIS_FULL_RETRY_AFTER_S = 5
"""Retry-After for a Redis at ``maxmemory``: memory comes back as jobs expire or an operator steps in."""
STORAGE_RETRY_AFTER_S = 5
"""Retry-After for object-store outages: the API already retried (botocore) before giving up."""


def status_title(status: int) -> str:
    """The standard reason phrase for ``status`` (RFC 9110 wording), used as the problem ``title``."""
    if status in _TITLES:
        return _TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def code_for_status(status: int) -> str:
    """A stable machine code for a bare HTTP status (``405`` → ``method_not_allowed``)."""
    if status in _HTTP_CODES:
        return _HTTP_CODES[status]
    try:
        return HTTPStatus(status).name.lower()
    except ValueError:
        return f"http_{status}"


class ApiError(Exception):
    """Base of every error a route raises on purpose; rendered as problem+json by one handler.

    The class carries the HTTP status and a default ``code``; an instance may narrow the code
    (``Conflict("...", code="job_already_finished")``) so clients can tell cases of one status apart.
    ``detail`` is shown to the client as-is: put no secrets and no internals in it.
    """

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal Server Error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        title: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        errors: Sequence[FieldError] | None = None,
    ) -> None:
        if status is not None:
            self.status = status
            self.title = status_title(status)
        if code is not None:
            self.code = code
        if title is not None:
            self.title = title
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})
        self.errors: list[FieldError] | None = list(errors) if errors else None
        super().__init__(detail or self.code)

    def to_problem(self, instance: str | None = None) -> Problem:
        """The body this error is rendered as; ``instance`` is the request path."""
        return Problem(
            type=problem_type(self.code),
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            code=self.code,
            errors=self.errors,
        )


class Unauthorized(ApiError):
    """401: no or wrong credentials. Carries ``WWW-Authenticate: Bearer`` as RFC 9110 requires."""

    status = 401
    code = "unauthorized"
    title = "Unauthorized"

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
        super().__init__(detail, code=code, title=title, headers=headers)


class NotFound(ApiError):
    """404: the resource (job, image) does not exist or is no longer retained."""

    status = 404
    code = "not_found"
    title = "Not Found"


class Conflict(ApiError):
    """409: the request clashes with the resource's state, e.g. ``code="job_already_finished"``."""

    status = 409
    code = "conflict"
    title = "Conflict"


class PayloadTooLarge(ApiError):
    """413: the body is bigger than the API accepts."""

    status = 413
    code = "payload_too_large"
    title = "Content Too Large"


class UnprocessableRequest(ApiError):
    """422 with a specific code, for rule violations that schema validation cannot see
    (``idempotency_key_reused``, ``webhook_url_not_allowed``)."""

    status = 422
    code = "unprocessable"
    title = "Unprocessable Content"


class ServiceUnavailable(ApiError):
    """503: a dependency is down or the service is saturated; tells the client when to retry."""

    status = 503
    code = "service_unavailable"
    title = "Service Unavailable"

    def __init__(
        self,
        detail: str | None = None,
        *,
        retry_after: int | None = 1,
        code: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        merged = dict(headers or {})
        if retry_after is not None:
            merged.setdefault("Retry-After", str(int(retry_after)))
        super().__init__(detail, code=code, title=title, headers=merged)


def problem_response(problem: Problem, headers: Mapping[str, str] | None = None) -> Response:
    """Render ``problem`` with the problem+json media type.

    Also usable from raw ASGI middleware, which runs outside FastAPI's exception handlers:
    ``await problem_response(err.to_problem(scope["path"]), err.headers)(scope, receive, send)``.
    Absent members are omitted rather than sent as ``null``, as RFC 9457 does. Under
    ``OPENAI_COMPATIBLE_PREFIX`` the body also carries OpenAI's ``error`` object (an extension member), which
    is what the ``openai`` SDKs read their exception's message, code and param from.
    """
    body = problem.model_dump(mode="json", exclude_none=True)
    if problem.instance is not None and problem.instance.startswith(OPENAI_COMPATIBLE_PREFIX):
        body["error"] = openai_error(problem).model_dump(mode="json")
    return JSONResponse(
        body,
        status_code=problem.status,
        headers=dict(headers or {}),
        media_type=PROBLEM_CONTENT_TYPE,
    )


def internal_error_problem(instance: str | None) -> Problem:
    """The 500 body: a fixed text, never the exception's message (it may carry internals or secrets)."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    detail = "An unexpected error occurred."
    if request_id:
        detail += f" Quote request id {request_id} when reporting it."
    return Problem(
        type=problem_type("internal_error"),
        title=status_title(500),
        status=500,
        detail=detail,
        instance=instance,
        code="internal_error",
    )


def mark_logged(exc: BaseException) -> None:
    """Flag ``exc`` as already logged with its traceback, so outer layers do not log it again."""
    exc.__dict__["_darkroom_logged"] = True


def was_logged(exc: BaseException) -> bool:
    return bool(exc.__dict__.get("_darkroom_logged"))


# --- handlers ----------------------------------------------------------------------------------------------


async def _api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return problem_response(exc.to_problem(request.url.path), exc.headers)


def _field_name(loc: Sequence[int | str]) -> str:
    """``("body", "images", 0, "url")`` → ``images.0.url``. Non-body sources keep their prefix
    (``query.limit``, ``header.idempotency-key``) so the client knows where to look."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    name = ".".join(str(part) for part in parts) if parts else "body"
    return name if len(name) <= MAX_FIELD_NAME_CHARS else name[: MAX_FIELD_NAME_CHARS - 1] + "…"


async def _validation_handler(request: Request, exc: Exception) -> Response:
    """422 for a body or parameter that fails validation.

    Unlike FastAPI's default handler this never echoes the offending ``input`` back: besides leaking
    what the client sent into logs and proxies, an input of ``NaN`` would make the JSON encoder fail and
    turn a client error into a 500.
    """
    assert isinstance(exc, RequestValidationError)
    instance = request.url.path
    if isinstance(exc.body, bytes):  # FastAPI hands over the raw bytes of a body not declared as JSON
        return _unsupported_media_type(instance, request.headers.get("content-type"))
    errors = list(exc.errors())
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid" and loc[:1] == ("body",):
            reason = (error.get("ctx") or {}).get("error") or "invalid JSON"
            position = f" at character {loc[1]}" if len(loc) > 1 else ""
            return _malformed_json(instance, f"The request body is not valid JSON: {reason}{position}.")
    field_errors = [
        FieldError(
            field=_field_name(error.get("loc", ())),
            message=_PYDANTIC_PREFIX.sub("", str(error.get("msg", ""))),
            type=str(error.get("type", "invalid")),
        )
        for error in errors[:MAX_LISTED_ERRORS]
    ]
    fields = ", ".join(dict.fromkeys(e.field for e in field_errors))
    noun = "field" if len(errors) == 1 else "fields"
    listed = f" (the first {MAX_LISTED_ERRORS} are listed)" if len(errors) > MAX_LISTED_ERRORS else ""
    problem = Problem(
        type=problem_type("validation_error"),
        title=status_title(422),
        status=422,
        detail=f"The request has {len(errors)} invalid {noun}{listed}: {fields}.",
        instance=instance,
        code="validation_error",
        errors=field_errors,
    )
    return problem_response(problem)


def _malformed_json(instance: str, detail: str) -> Response:
    problem = Problem(
        type=problem_type("malformed_json"),
        title=status_title(422),
        status=422,
        detail=detail,
        instance=instance,
        code="malformed_json",
    )
    return problem_response(problem)


JSON_MEDIA_TYPE = "application/json"
MAX_ECHOED_MEDIA_TYPE_CHARS = 100


def _unsupported_media_type(instance: str, content_type: str | None) -> Response:
    """415 for a body whose Content-Type is not JSON (curl's ``-d`` sends a form's), or which has none.

    Without this, FastAPI validates the raw bytes and the client reads "Input should be a valid
    dictionary", which says nothing about the header that is actually wrong. A body without a
    Content-Type is refused too, as FastAPI does (strict content type): a browser may send one cross-site
    without a CORS preflight, and a server with auth off must not take that as a submission.
    """
    media_type = (content_type or "").split(";", 1)[0].strip()[:MAX_ECHOED_MEDIA_TYPE_CHARS]
    sent = f"Content-Type {media_type!r}" if media_type else "no Content-Type"
    problem = Problem(
        type=problem_type("unsupported_media_type"),
        title=status_title(415),
        status=415,
        detail=f"The request body was sent with {sent}; this endpoint takes {JSON_MEDIA_TYPE} "
        f"(send 'Content-Type: {JSON_MEDIA_TYPE}'; with curl, --json instead of -d).",
        instance=instance,
        code="unsupported_media_type",
    )
    return problem_response(problem, {"Accept-Post": JSON_MEDIA_TYPE})


def _undecodable_body_reason(cause: BaseException | None) -> str | None:
    if isinstance(cause, UnicodeDecodeError):
        return "it is not UTF-8 encoded"
    if isinstance(cause, RecursionError):
        return "it is nested too deeply"
    if isinstance(cause, ValueError):  # int("9" * 5000) refuses, past sys.get_int_max_str_digits()
        return "it holds a number with too many digits" if "digits" in str(cause) else "it cannot be decoded"
    return None


async def _http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette/FastAPI ``HTTPException``: unknown routes (404), wrong methods (405, keeping ``Allow``),
    bodies FastAPI could not parse (400), and our body-size limit (413)."""
    assert isinstance(exc, StarletteHTTPException)
    instance = request.url.path
    status = exc.status_code
    headers = dict(exc.headers or {})
    if status in (204, 304) or status < 400:
        return Response(status_code=status, headers=headers)
    # FastAPI turns any non-JSONDecodeError failure while decoding the body into a bare 400. To the client
    # these are all malformed JSON, whatever the decoder's internals: bytes that are not UTF-8, nesting
    # deeper than the parser's recursion limit, an integer past Python's 4300-digit conversion limit.
    reason = _undecodable_body_reason(exc.__cause__) if status == 400 else None
    if reason is not None:
        return _malformed_json(instance, f"The request body is not valid JSON: {reason}.")
    title = status_title(status)
    detail: str | None = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
    if status == 404 and "route" not in request.scope:
        detail = f"No resource at {instance}."
    elif status == 405:
        allowed = headers.get("Allow") or headers.get("allow")
        detail = f"Method {request.method} is not allowed here" + (f"; use {allowed}." if allowed else ".")
    problem = Problem(
        type=problem_type(code_for_status(status)),
        title=title,
        status=status,
        detail=detail,
        instance=instance,
        code=code_for_status(status),
    )
    return problem_response(problem, headers)


def _dependency_unavailable(
    request: Request, exc: Exception, *, code: str, what: str, retry_after_s: int
) -> Response:
    """503 with ``Retry-After`` for a dependency that is down: transient, not our bug. The exception text
    (host, port) goes to the log only."""
    log.warning(code.replace("_", " "), error_type=type(exc).__name__, error=str(exc))
    problem = Problem(
        type=problem_type(code),
        title=status_title(503),
        status=503,
        detail=f"{what} is temporarily unreachable; retry shortly.",
        instance=request.url.path,
        code=code,
    )
    return problem_response(problem, {"Retry-After": str(retry_after_s)})


async def _redis_unavailable_handler(request: Request, exc: Exception) -> Response:
    """Redis down, loading its dataset, or too slow: the job store is unreachable."""
    return _dependency_unavailable(
        request, exc, code="redis_unavailable", what="The job store", retry_after_s=REDIS_RETRY_AFTER_S
    )


async def _redis_response_error_handler(request: Request, exc: Exception) -> Response:
    """Redis at ``maxmemory`` (``noeviction``) refuses writes — as ``-OOM``, or from inside a script as a
    script error: 503 ``redis_out_of_memory`` with ``Retry-After``. Any other error reply is our bug."""
    if not out_of_memory(exc):
        return await _internal_error_handler(request, exc)
    log.warning("redis out of memory", path=request.url.path, error=str(exc))
    problem = Problem(
        type=problem_type("redis_out_of_memory"),
        title=status_title(503),
        status=503,
        detail="The job store is full and refuses new writes; retry later.",
        instance=request.url.path,
        code="redis_out_of_memory",
    )
    return problem_response(problem, {"Retry-After": str(REDIS_FULL_RETRY_AFTER_S)})


async def _storage_unavailable_handler(request: Request, exc: Exception) -> Response:
    """The object store is unreachable (only an init image upload needs it on the request path)."""
    return _dependency_unavailable(
        request, exc, code="storage_unavailable", what="The image store", retry_after_s=STORAGE_RETRY_AFTER_S
    )


async def _internal_error_handler(request: Request, exc: Exception) -> Response:
    """Last resort for any other exception: log the traceback, answer a generic 500.

    Starlette calls this from its outermost ``ServerErrorMiddleware`` and then re-raises, so the server
    logs it as well; ``RequestContextMiddleware`` normally answers first (with the request id bound) and
    marks the exception as logged, in which case it is not logged again here.
    """
    if not was_logged(exc):
        log.error("unhandled exception", exc_info=exc, path=request.url.path)
        mark_logged(exc)
    return problem_response(internal_error_problem(request.url.path))


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler on ``app``.

    Call once in the app factory. Order of registration does not matter: Starlette picks the handler
    of the closest class in the exception's MRO, and the ``Exception`` one only runs at the very edge.
    """
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    for redis_error in (
        redis.exceptions.ConnectionError,  # BusyLoadingError is a subclass, registered for clarity
        redis.exceptions.BusyLoadingError,
        redis.exceptions.TimeoutError,  # NotReplicated (too few replicas acknowledged) is a subclass
        redis.exceptions.ReadOnlyError,  # a replica answered: the primary is moving (a failover)
    ):
        app.add_exception_handler(redis_error, _redis_unavailable_handler)
    app.add_exception_handler(redis.exceptions.ResponseError, _redis_response_error_handler)  # OOM included
    app.add_exception_handler(StorageUnavailable, _storage_unavailable_handler)
    app.add_exception_handler(Exception, _internal_error_handler)
