"""Raw ASGI middlewares: request id + access log, Prometheus HTTP metrics, request body size limit.

Raw ASGI rather than Starlette's ``BaseHTTPMiddleware`` because that one runs the app in a separate task:
context variables bound by a route (``job_id``) would not reach the middleware, streamed (SSE) responses
are buffered through a memory stream, and background tasks get cancelled with the client.

Install order in the app factory (``add_middleware`` wraps, so the *last* added runs *first*)::

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=...)  # innermost: before any body is parsed
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestContextMiddleware)                 # outermost: binds request_id first

Every middleware here takes the final status from the ``http.response.start`` message it forwards and
records metrics / access log *before* forwarding the last body chunk, so a client that has the full
response can rely on the metric and log line already existing.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Collection
from typing import Final

import structlog
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import PayloadTooLarge, internal_error_problem, mark_logged, problem_response
from services.metrics import HTTP_LATENCY, HTTP_REQUESTS

log = structlog.get_logger(__name__)

REQUEST_ID_HEADER: Final = "X-Request-ID"
UNMATCHED_ROUTE: Final = "<unmatched>"
_REQUEST_ID_HEADER_LOWER: Final = REQUEST_ID_HEADER.lower().encode("latin-1")
# Ids from clients/proxies are echoed into headers and logs: accept only a safe, bounded alphabet.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Anything else goes into one label value, so a client inventing methods cannot grow label cardinality.
_KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(scope: Scope) -> str:
    """The matched route's full path template (``/v1/generations/{job_id}``), or ``"<unmatched>"``.

    Read once the app has run: the router records its match in the scope dict every middleware shares.
    ``scope["route"].path`` alone is not enough. FastAPI (≥ 0.13x) no longer copies included routes
    into the app with their prefix: ``scope["route"]`` is the route as declared in its ``APIRouter``
    (``/{job_id}``), and the full template lives in the effective route context FastAPI keeps in
    ``scope["fastapi"]``. And a route inside a mounted app sees only its own part of the path; the
    mount prefix is what mounts added to ``root_path`` beyond the app's own root path. A mounted app
    that has no routes of its own (a ``/metrics`` ASGI app) is labelled by its mount prefix.
    """
    root_path: str = scope.get("root_path", "")
    app_root_path: str = scope.get("app_root_path", root_path)
    mount_prefix = root_path[len(app_root_path) :].rstrip("/") if root_path.startswith(app_root_path) else ""
    route = scope.get("route")
    template = _included_route_template(scope, route)
    if template is None and route is not None and not isinstance(route, Mount):
        template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return mount_prefix or UNMATCHED_ROUTE
    return mount_prefix + template or "/"


def _included_route_template(scope: Scope, route: object) -> str | None:
    """Full template of a route reached through ``include_router`` (FastAPI's private scope data,
    read defensively: absent on FastAPI versions that still copy included routes with their prefix)."""
    fastapi_scope = scope.get("fastapi")
    if not isinstance(fastapi_scope, dict):
        return None
    context = fastapi_scope.get("effective_route_context")
    if context is None or getattr(context, "original_route", None) is not route:
        return None  # stale, or describing another route than the one that answered
    path_format = getattr(context, "path_format", None)
    return path_format if isinstance(path_format, str) else None


def method_label(scope: Scope) -> str:
    method: str = scope.get("method", "")
    return method if method in _KNOWN_METHODS else "OTHER"


def current_request_id() -> str | None:
    """The id of the request being handled in this context (e.g. to store on a job), if any."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    return request_id if isinstance(request_id, str) else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _is_final_body(message: Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


def _is_event_stream(message: Message) -> bool:
    for key, value in message.get("headers", ()):
        if key.lower() == b"content-type":
            return bytes(value).lower().startswith(b"text/event-stream")
    return False


class RequestContextMiddleware:
    """Give every request an id, bind it to every log line, and write one access log line.

    The id comes from a valid incoming ``X-Request-ID`` (so a proxy's id links both logs) or is
    generated; it is echoed on the response, bound as ``request_id`` in structlog's context variables
    for the request's duration, and put in ``request.state.request_id``.

    This middleware also answers unhandled exceptions with the 500 problem itself: Starlette's own
    catch-all sits *outside* all user middleware, where the request id is already unbound and the
    response would lack the ``X-Request-ID`` header.

    ``quiet_routes``: templates (e.g. ``/metrics``, ``/healthz``) whose access lines go to DEBUG, so
    scrapes and probes do not drown the log.
    """

    def __init__(self, app: ASGIApp, quiet_routes: Collection[str] = ()) -> None:
        self.app = app
        self.quiet_routes = frozenset(quiet_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        incoming = _header(scope, _REQUEST_ID_HEADER_LOWER)
        request_id = incoming if incoming and _VALID_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        outer_context = structlog.contextvars.get_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)

        start = time.perf_counter()
        status: int | None = None
        logged = False

        def access_log() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            route = route_template(scope)
            log.log(
                # A probe or scrape that succeeded says nothing; one that failed (a 503 /readyz) does.
                logging.DEBUG
                if route in self.quiet_routes and status is not None and status < 400
                else logging.INFO,
                "http_request",
                method=scope.get("method"),
                path=scope.get("path"),  # never the query string: it may carry tokens
                route=route,
                status=status,  # None only if the request was cancelled before any response
                duration_ms=round((time.perf_counter() - start) * 1000, 2),
            )

        async def send_with_context(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != _REQUEST_ID_HEADER_LOWER
                ]
                headers.append((_REQUEST_ID_HEADER_LOWER, request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            elif _is_final_body(message):
                access_log()
            await send(message)

        try:
            await self.app(scope, receive, send_with_context)
        except Exception as exc:
            if status is not None:  # the response already started: all we can do is let the server abort it
                log.error("unhandled exception after the response started", exc_info=exc)
                mark_logged(exc)
                raise
            log.error("unhandled exception", exc_info=exc, path=scope.get("path"))
            mark_logged(exc)
            # Answered here, with the id bound; re-raising would only make Starlette and the server log
            # the same traceback twice more.
            await problem_response(internal_error_problem(scope.get("path")))(
                scope, receive, send_with_context
            )
        finally:
            access_log()
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(**outer_context)


class MetricsMiddleware:
    """Count every response and time the non-streaming ones, labelled by route template.

    Labels use the route *template* (``/items/{item_id}``) resolved by the router, never the raw path,
    so ids in URLs cannot explode cardinality; unmatched paths share ``"<unmatched>"``. Server-sent
    event streams are counted but not timed: their duration is the client's watch time, and would
    swamp the latency histogram.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        start = time.perf_counter()
        status: int | None = None
        streaming = False
        recorded = False

        def record(final_status: int) -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            method, route = method_label(scope), route_template(scope)
            HTTP_REQUESTS.labels(method=method, route=route, status=str(final_status)).inc()
            if not streaming:
                HTTP_LATENCY.labels(method=method, route=route).observe(time.perf_counter() - start)

        async def send_with_metrics(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                streaming = _is_event_stream(message)
            elif _is_final_body(message) and status is not None:
                record(status)
            await send(message)

        try:
            await self.app(scope, receive, send_with_metrics)
        except Exception:
            # Not started: an outer layer will answer 500. Started: the client gets a cut response.
            record(500 if status is None else status)
            raise
        finally:
            if status is not None:
                record(status)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` when a streamed body passes the limit.

    An ``HTTPException`` on purpose: FastAPI re-raises those unchanged while reading the body (anything
    else it turns into a 400), so the error handler renders the 413 problem.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(status_code=413, detail=_too_large_detail(max_bytes))


def _too_large_detail(max_bytes: int) -> str:
    return f"The request body is larger than the {max_bytes} bytes this API accepts."


class BodySizeLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with a 413 problem, before anything parses them.

    A declared ``Content-Length`` over the limit is refused without reading a byte; chunked (or
    mis-declared) bodies are counted as they stream in and cut off the moment they pass the limit, so
    a client cannot make the API buffer an arbitrarily large JSON document.

    Use this rather than ``FastAPI(max_body_size=...)``: Starlette's limiter answers some of its 413s as
    ``text/plain``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return

        received = 0
        started = False

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_with_limit, send_tracking)
        except _BodyTooLarge:
            # Reached only when the body was read outside FastAPI's handlers (which render it themselves).
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(_too_large_detail(self.max_bytes))
        # We will not read the rest of the body, so the connection cannot be reused for another request.
        headers = {**error.headers, "Connection": "close"}
        await problem_response(error.to_problem(scope.get("path")), headers)(scope, receive, send)
