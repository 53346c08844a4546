"""Request ids, access logs, route-template metrics and the body limit, over real HTTP against uvicorn."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import structlog
from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import StreamingResponse
from prometheus_client import REGISTRY, make_asgi_app
from starlette.types import Message, Receive, Scope, Send

from api.errors import install_error_handlers
from api.middleware import (
    UNMATCHED_ROUTE,
    BodySizeLimitMiddleware,
    MetricsMiddleware,
    RequestContextMiddleware,
    current_request_id,
)
from schemas.problems import PROBLEM_CONTENT_TYPE
from tests.api import LogCapture, capture_json_logs, serve

GENERATED_ID = re.compile(r"[0-9a-f]{32}")
REQUESTS = "darkroom_http_requests_total"
LATENCY_COUNT = "darkroom_http_request_duration_seconds_count"
stdlib_log = logging.getLogger("tests.api.routes")


def build_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=256)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestContextMiddleware, quiet_routes={"/metrics", "/probe"})

    @app.get("/probe")
    async def probe(fail: bool = False) -> Response:
        return Response(status_code=503 if fail else 200)

    @app.get("/items/{item_id}")
    async def get_item(item_id: str) -> dict[str, Any]:
        structlog.get_logger("tests.api.routes").info("reading item", item_id=item_id)
        await asyncio.sleep(0)  # let concurrent requests interleave here
        return {"id": item_id, "request_id": current_request_id()}

    @app.get("/sync/context")
    def sync_context() -> dict[str, Any]:  # threadpool: the context must be copied into the worker thread
        stdlib_log.info("inside a sync route")
        return structlog.contextvars.get_contextvars()

    @app.get("/bind-job")
    async def bind_job() -> dict[str, str]:
        structlog.contextvars.bind_contextvars(job_id="job_1")
        return {"ok": "yes"}

    @app.get("/events")
    async def events() -> StreamingResponse:
        async def stream() -> AsyncIterator[bytes]:
            for n in range(3):
                yield f"data: {n}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/crash/{n}")
    async def crash(n: int) -> None:
        raise RuntimeError("boom")

    @app.get("/broken-stream")
    async def broken_stream() -> StreamingResponse:
        async def stream() -> AsyncIterator[bytes]:
            yield b"first chunk\n"
            raise RuntimeError("died mid-stream")

        return StreamingResponse(stream(), media_type="text/plain")

    sub = FastAPI()

    @sub.get("/things/{thing_id}")
    async def get_thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    sub_router = APIRouter()

    @sub_router.get("/{widget_id}")
    async def get_widget(widget_id: str) -> dict[str, str]:
        return {"id": widget_id}

    sub.include_router(sub_router, prefix="/widgets")
    app.mount("/sub", sub)

    # The usual layout: a router per resource, its prefix given at include time. FastAPI then reports
    # the route as declared ("/{job_id}/events") in scope["route"]; the label must still be the full one.
    router = APIRouter()

    @router.get("/{job_id}/events")
    async def job_events(job_id: str) -> dict[str, str]:
        return {"id": job_id}

    app.include_router(router, prefix="/v1/jobs")
    app.mount("/metrics", make_asgi_app())
    return app


@pytest.fixture(scope="module")
def logs() -> Iterator[LogCapture]:
    with capture_json_logs() as capture:
        yield capture


@pytest.fixture(scope="module")
def client(logs: LogCapture) -> Iterator[httpx.Client]:
    with serve(build_app()) as url, httpx.Client(base_url=url, timeout=10) as c:
        yield c


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def route_labels() -> set[str]:
    """Every ``route`` label value the HTTP request counter has seen in this process."""
    return {
        s.labels["route"]
        for metric in REGISTRY.collect()
        if metric.name == REQUESTS.removesuffix("_total")
        for s in metric.samples
        if "route" in s.labels
    }


# --- request id --------------------------------------------------------------------------------------------


def test_generates_request_id(client: httpx.Client) -> None:
    first, second = client.get("/items/1"), client.get("/items/1")
    assert GENERATED_ID.fullmatch(first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert first.json()["request_id"] == first.headers["x-request-id"]


def test_echoes_valid_incoming_request_id(client: httpx.Client) -> None:
    response = client.get("/items/1", headers={"X-Request-ID": "edge-proxy.42_abc"})
    assert response.headers["x-request-id"] == "edge-proxy.42_abc"
    assert response.json()["request_id"] == "edge-proxy.42_abc"


@pytest.mark.parametrize("bad", ["x" * 129, "has space", "semi;colon", "ünïcode", ""])
def test_replaces_invalid_incoming_request_id(client: httpx.Client, bad: str) -> None:
    response = client.get("/items/1", headers=[(b"X-Request-ID", bad.encode())])
    assert GENERATED_ID.fullmatch(response.headers["x-request-id"])
    assert len(response.headers.get_list("x-request-id")) == 1


def test_concurrent_requests_keep_their_own_ids(client: httpx.Client) -> None:
    ids = [f"concurrent-{n}" for n in range(32)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda rid: client.get("/items/c", headers={"X-Request-ID": rid}), ids))
    assert [r.json()["request_id"] for r in responses] == ids
    assert [r.headers["x-request-id"] for r in responses] == ids


def test_request_id_on_error_responses(client: httpx.Client) -> None:
    for response in (client.get("/nowhere"), client.get("/crash/1"), client.delete("/items/1")):
        assert GENERATED_ID.fullmatch(response.headers["x-request-id"]), response.status_code
        assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE


def test_request_id_reaches_sync_routes(client: httpx.Client) -> None:
    response = client.get("/sync/context", headers={"X-Request-ID": "sync-1"})
    assert response.json() == {"request_id": "sync-1"}


def test_context_bound_by_a_route_does_not_outlive_its_request(client: httpx.Client) -> None:
    assert client.get("/bind-job").json() == {"ok": "yes"}
    assert client.get("/sync/context").json().keys() == {"request_id"}


def test_context_is_restored_after_the_request() -> None:
    """Unit level, one event loop: what was bound outside survives, what the request bound does not."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        structlog.contextvars.bind_contextvars(job_id="job_9")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def run() -> tuple[dict[str, Any], list[Message]]:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b""}

        async def send(message: Message) -> None:
            sent.append(message)

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(worker="w1")
        scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
        await RequestContextMiddleware(app)(scope, receive, send)
        return structlog.contextvars.get_contextvars(), sent

    context, sent = asyncio.run(run())
    assert context == {"worker": "w1"}
    name, value = sent[0]["headers"][-1]
    assert name == b"x-request-id" and GENERATED_ID.fullmatch(value.decode())


# --- access log and bound context in log lines -------------------------------------------------------------


def test_access_line_and_route_logs_carry_request_id(client: httpx.Client, logs: LogCapture) -> None:
    logs.mark()
    response = client.get("/items/abc", headers={"X-Request-ID": "log-test-1"})
    assert response.status_code == 200
    lines = logs.lines()
    route_line = next(line for line in lines if line["event"] == "reading item")
    assert route_line["request_id"] == "log-test-1" and route_line["item_id"] == "abc"
    access = [line for line in lines if line["event"] == "http_request"]
    assert len(access) == 1
    assert access[0]["request_id"] == "log-test-1"
    assert access[0]["method"] == "GET"
    assert access[0]["route"] == "/items/{item_id}"
    assert access[0]["path"] == "/items/abc"
    assert access[0]["status"] == 200
    assert isinstance(access[0]["duration_ms"], float) and access[0]["duration_ms"] >= 0
    assert access[0]["level"] == "info" and "timestamp" in access[0]


def test_stdlib_logger_in_sync_route_carries_request_id(client: httpx.Client, logs: LogCapture) -> None:
    logs.mark()
    client.get("/sync/context", headers={"X-Request-ID": "stdlib-1"})
    line = next(line for line in logs.lines() if line["event"] == "inside a sync route")
    assert line["request_id"] == "stdlib-1" and line["logger"] == "tests.api.routes"


def test_access_log_never_has_query_string(client: httpx.Client, logs: LogCapture) -> None:
    logs.mark()
    client.get("/items/q", params={"token": "s3cr3t"})
    (access,) = [line for line in logs.lines() if line["event"] == "http_request"]
    assert access["path"] == "/items/q"
    assert "s3cr3t" not in logs.buffer.getvalue()


def test_quiet_routes_log_at_debug(client: httpx.Client, logs: LogCapture) -> None:
    logs.mark()
    client.get("/metrics/")
    (access,) = [line for line in logs.lines() if line["event"] == "http_request"]
    assert access["level"] == "debug" and access["route"] == "/metrics"


def test_a_failing_probe_is_logged_at_info(client: httpx.Client, logs: LogCapture) -> None:
    """Successful probes are noise (make run polls /readyz while the model loads); a failing one is news."""
    logs.mark()
    client.get("/probe")
    client.get("/probe", params={"fail": "true"})
    levels = [(line["level"], line["status"]) for line in logs.lines() if line["event"] == "http_request"]
    assert levels == [("debug", 200), ("info", 503)]


# --- metrics -----------------------------------------------------------------------------------------------


def test_metrics_use_route_template_not_raw_path(client: httpx.Client) -> None:
    labels = {"method": "GET", "route": "/items/{item_id}"}
    before = sample(REQUESTS, **labels, status="200"), sample(LATENCY_COUNT, **labels)
    client.get("/items/123")
    client.get("/items/456")
    after = sample(REQUESTS, **labels, status="200"), sample(LATENCY_COUNT, **labels)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)
    assert not {"/items/123", "/items/456"} & route_labels()


def test_included_router_routes_are_labelled_with_their_prefix(client: httpx.Client) -> None:
    client.get("/v1/jobs/job_1/events")
    assert "/v1/jobs/{job_id}/events" in route_labels()
    assert "/{job_id}/events" not in route_labels()


def test_unmatched_paths_share_one_label(client: httpx.Client) -> None:
    labels = {"method": "GET", "route": UNMATCHED_ROUTE, "status": "404"}
    before = sample(REQUESTS, **labels)
    client.get("/random/path/1")
    client.get("/random/path/2")
    assert sample(REQUESTS, **labels) - before == 2
    assert not any(label.startswith("/random") for label in route_labels())


def test_unknown_methods_share_one_label(client: httpx.Client) -> None:
    labels = {"method": "OTHER", "route": "/items/{item_id}", "status": "405"}
    before = sample(REQUESTS, **labels)
    assert client.request("PROPFIND", "/items/1").status_code == 405  # WebDAV: parsed, but not ours
    assert sample(REQUESTS, **labels) - before == 1


def test_event_streams_are_counted_but_not_timed(client: httpx.Client) -> None:
    labels = {"method": "GET", "route": "/events"}
    before = sample(REQUESTS, **labels, status="200"), sample(LATENCY_COUNT, **labels)
    response = client.get("/events")
    assert response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    after = sample(REQUESTS, **labels, status="200"), sample(LATENCY_COUNT, **labels)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)


def test_unhandled_exceptions_count_as_500_under_their_template(client: httpx.Client) -> None:
    labels = {"method": "GET", "route": "/crash/{n}", "status": "500"}
    before = sample(REQUESTS, **labels)
    assert client.get("/crash/7").status_code == 500
    assert sample(REQUESTS, **labels) - before == 1


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/sub/things/42", "/sub/things/{thing_id}"),  # a mounted FastAPI app's own routes
        ("/sub/widgets/w1", "/sub/widgets/{widget_id}"),  # ... and its included routers
        ("/v1/jobs/job_1/events", "/v1/jobs/{job_id}/events"),  # a router included with a prefix
        ("/metrics/", "/metrics"),  # a plain ASGI app mounted whole
    ],
)
def test_templates_under_mounts_and_prefixes(client: httpx.Client, path: str, template: str) -> None:
    before = sample(REQUESTS, method="GET", route=template, status="200")
    assert client.get(path).status_code == 200
    assert sample(REQUESTS, method="GET", route=template, status="200") - before == 1


def test_exception_after_response_started_aborts_and_counts(client: httpx.Client, logs: LogCapture) -> None:
    labels = {"method": "GET", "route": "/broken-stream", "status": "200"}
    before = sample(REQUESTS, **labels)
    logs.mark()
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/broken-stream")
    assert sample(REQUESTS, **labels) - before == 1
    errors = [line for line in logs.lines() if line["level"] == "error" and line.get("request_id")]
    assert errors and "died mid-stream" in errors[0]["exception"]
    assert client.get("/items/1").status_code == 200  # the server carries on


# --- body size limit ---------------------------------------------------------------------------------------


def test_body_limit_also_guards_raw_asgi_apps() -> None:
    """Bodies read outside FastAPI's handlers: the middleware renders the 413 problem itself."""

    async def echo(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    with serve(BodySizeLimitMiddleware(echo, max_bytes=10)) as url, httpx.Client(base_url=url) as c:
        assert c.post("/", content=b"0123456789").content == b"0123456789"
        for content in (b"0123456789X", iter([b"01234", b"56789", b"X"])):
            response = c.post("/", content=content)
            assert response.status_code == 413
            assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
            assert response.json()["code"] == "payload_too_large"


def test_body_limit_rejects_negative_limit() -> None:
    with pytest.raises(ValueError):
        BodySizeLimitMiddleware(lambda *a: None, max_bytes=-1)  # type: ignore[arg-type]
