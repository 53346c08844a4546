"""configure_logging: one line shape for structlog and stdlib loggers, context ids, redaction, idempotency."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from services.logging import REDACTED, configure_logging, is_sensitive_key

Configure = Callable[..., io.StringIO]


@pytest.fixture
def configure() -> Iterator[Configure]:
    """``configure(environment, level)`` into a fresh buffer; the previous logging setup is restored
    afterwards, because ``configure_logging`` changes process-wide state."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker", "rq.job", "rq.scheduler")
    saved_foreign = {
        n: (lg.handlers[:], lg.propagate, lg.level) for n in names for lg in [logging.getLogger(n)]
    }
    saved_structlog = structlog.get_config()
    structlog.contextvars.clear_contextvars()

    def run(environment: str = "production", level: str = "DEBUG") -> io.StringIO:
        buffer = io.StringIO()
        configure_logging(environment, level, stream=buffer)
        return buffer

    try:
        yield run
    finally:
        for handler in root.handlers[:]:
            if handler not in saved_handlers:
                root.removeHandler(handler)
        root.setLevel(saved_level)
        for name, (handlers, propagate, level) in saved_foreign.items():
            foreign = logging.getLogger(name)
            foreign.handlers[:] = handlers
            foreign.propagate = propagate
            foreign.setLevel(level)
        structlog.configure(**saved_structlog)
        structlog.contextvars.clear_contextvars()


def json_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_production_writes_json_lines_with_bound_context(configure: Configure) -> None:
    buffer = configure("production")
    structlog.contextvars.bind_contextvars(request_id="req-1", job_id="job-1")
    structlog.get_logger("darkroom.test").info("job started", steps=28)
    logging.getLogger("darkroom.stdlib").warning("queue is %d deep", 7)
    first, second = json_lines(buffer)
    assert first["event"] == "job started" and first["steps"] == 28
    assert second["event"] == "queue is 7 deep"
    for line, logger, level in ((first, "darkroom.test", "info"), (second, "darkroom.stdlib", "warning")):
        assert line["request_id"] == "req-1" and line["job_id"] == "job-1"
        assert line["logger"] == logger and line["level"] == level
        assert line["timestamp"].endswith("Z")
    assert set(first) - {"steps"} == set(second)  # the same shape whichever API logged


def test_third_party_loggers_share_the_shape(configure: Configure) -> None:
    """uvicorn and RQ install handlers of their own; ours replaces them, and uvicorn's access log
    (duplicating the API's own access line) stays quiet."""
    logging.getLogger("uvicorn.error").addHandler(logging.StreamHandler(io.StringIO()))
    logging.getLogger("uvicorn.error").propagate = False
    buffer = configure("production", "INFO")
    structlog.contextvars.bind_contextvars(request_id="req-2")
    logging.getLogger("uvicorn.error").info("Started server process")
    logging.getLogger("rq.worker").info("Worker started")
    logging.getLogger("uvicorn.access").info("127.0.0.1 - GET / 200")
    lines = json_lines(buffer)
    assert [(line["logger"], line["event"]) for line in lines] == [
        ("uvicorn.error", "Started server process"),
        ("rq.worker", "Worker started"),
    ]
    assert all(line["request_id"] == "req-2" for line in lines)


def test_uvicorns_color_message_is_dropped(configure: Configure) -> None:
    """uvicorn passes its message again with ANSI colours as ``color_message``; it must not be a field."""
    buffer = configure("production", "INFO")
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on %s", "http://127.0.0.1:8000", extra={"color_message": "\x1b[1m%s\x1b[0m"}
    )
    (line,) = json_lines(buffer)
    assert line["event"] == "Uvicorn running on http://127.0.0.1:8000"
    assert "color_message" not in line and "\x1b" not in buffer.getvalue()


def test_stdlib_extra_fields_are_kept(configure: Configure) -> None:
    buffer = configure()
    logging.getLogger("x").info("stored", extra={"key": "outputs/job_1/0.png", "bytes": 1024})
    (line,) = json_lines(buffer)
    assert line["key"] == "outputs/job_1/0.png" and line["bytes"] == 1024  # "key" alone is no secret


def test_exceptions_are_one_field_of_the_line(configure: Configure) -> None:
    buffer = configure()
    try:
        raise ValueError("bad value")
    except ValueError:
        logging.getLogger("x").exception("failed")
        structlog.get_logger("y").exception("failed too")
    lines = json_lines(buffer)
    assert len(lines) == 2
    for line in lines:
        assert line["level"] == "error"
        assert "Traceback" in line["exception"] and "ValueError: bad value" in line["exception"]


def test_level_filters_both_apis(configure: Configure) -> None:
    buffer = configure("production", "WARNING")
    structlog.get_logger("x").info("hidden")
    logging.getLogger("x").info("hidden")
    structlog.get_logger("x").warning("shown")
    assert [line["event"] for line in json_lines(buffer)] == ["shown"]


def test_development_is_readable_text(configure: Configure) -> None:
    buffer = configure("development")
    structlog.contextvars.bind_contextvars(request_id="req-3")
    structlog.get_logger("x").info("hello", api_key="sk-live-123")
    output = buffer.getvalue()
    assert not output.startswith("{")
    assert "hello" in output and "request_id=req-3" in output
    assert "sk-live-123" not in output and REDACTED in output
    assert "\x1b[" not in output  # no colour codes when the stream is not a terminal


def test_idempotent(configure: Configure) -> None:
    configure()
    buffer = configure()
    structlog.get_logger("x").info("once")
    logging.getLogger("x").info("once")
    assert len(json_lines(buffer)) == 2
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_DarkroomHandler"]
    assert len(ours) == 1


def test_reconfiguring_moves_existing_loggers_along(configure: Configure) -> None:
    """Module-level loggers outlive a reconfiguration (tests, a dev reload): none may keep writing
    to the old handler or in the old format."""
    log = structlog.get_logger("early")
    first = configure("production")
    log.info("one")
    second = configure("development")
    log.info("two")
    assert [line["event"] for line in json_lines(first)] == ["one"]
    assert "two" in second.getvalue() and not second.getvalue().startswith("{")


def test_secrets_are_redacted_at_any_depth(configure: Configure) -> None:
    buffer = configure()
    structlog.get_logger("x").info(
        "calling out",
        password="hunter2",
        webhook_secret="whsec_c2VjcmV0",
        access_token="tok-1",
        headers={"Authorization": "Bearer abc.def", "X-API-Key": "k-1", "Accept": "application/json"},
        raw_headers=[(b"authorization", b"Basic dXNlcjpwYXNz"), (b"content-type", b"application/json")],
        nested={"deeper": [{"client_secret": "cs-1"}]},
        max_tokens=77,
    )
    logging.getLogger("x").info("auth header was %s", "Bearer xyz.123", extra={"api_key": "k-2"})
    output = buffer.getvalue()
    for secret in (
        "hunter2",
        "c2VjcmV0",
        "tok-1",
        "abc.def",
        "k-1",
        "dXNlcjpwYXNz",
        "cs-1",
        "xyz.123",
        "k-2",
    ):
        assert secret not in output, secret
    first, second = json_lines(buffer)
    assert first["headers"] == {
        "Authorization": REDACTED,
        "X-API-Key": REDACTED,
        "Accept": "application/json",
    }
    assert first["max_tokens"] == 77
    assert second["event"] == f"auth header was Bearer {REDACTED}"
    assert second["api_key"] == REDACTED


def test_secrets_in_text_and_tracebacks_are_scrubbed(configure: Configure) -> None:
    buffer = configure()
    try:
        raise ConnectionError("cannot connect to redis://:s3cret-pw@redis:6379/0")
    except ConnectionError:
        structlog.get_logger("x").exception("redis down", url="https://hook.example/cb?token=t0k3n&n=1")
    (line,) = json_lines(buffer)
    assert "s3cret-pw" not in line["exception"] and f"redis://:{REDACTED}@redis:6379/0" in line["exception"]
    assert line["url"] == f"https://hook.example/cb?token={REDACTED}&n=1"


@pytest.mark.parametrize(
    ("key", "sensitive"),
    [
        ("Authorization", True),
        ("proxy-authorization", True),
        ("x-api-key", True),
        ("api_key", True),
        ("DARKROOM_WEBHOOK_SECRET", True),
        ("password", True),
        ("token", True),
        ("refresh_token", True),
        ("set-cookie", True),
        ("url_signing_key", True),
        ("max_tokens", False),
        ("token_count", False),
        ("key", False),
        ("idempotency_key", False),
        ("job_id", False),
    ],
)
def test_sensitive_keys(key: str, sensitive: bool) -> None:
    assert is_sensitive_key(key) is sensitive


def test_rejects_unknown_environment_and_level() -> None:
    with pytest.raises(ValueError, match="environment"):
        configure_logging("staging")
    with pytest.raises(ValueError, match="level"):
        configure_logging("production", "LOUD")


def test_development_lines_escape_control_characters_from_requests(configure: Configure) -> None:
    """A URL path (or any value) with terminal escapes or line breaks prints as escapes, on one line: it
    can neither drive the terminal nor forge a log line. JSON lines escape them already."""
    buffer = configure("development")
    path = "/v1/generations/\x1b]0;pwned\x07\x1b[2J\r\n2026-01-01 [info] forged\u202e"
    structlog.get_logger("x").info("request", path=path)
    logging.getLogger("y").warning("stdlib too: %s", path)
    output = buffer.getvalue()
    assert "\x1b" not in output and "\x07" not in output and "\r" not in output and "\u202e" not in output
    assert output.count("\n") == 2  # one line each
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\r\\n2026-01-01 [info] forged\\u202e" in output
    production = configure("production")
    structlog.get_logger("x").info("request", path=path)
    assert json_lines(production)[0]["path"] == path  # JSON keeps the value exact, escaped by JSON itself
