"""Structured logging for both processes: one line shape, context ids on every line, secrets redacted.

Everything ends in one stdlib handler on the root logger whose ``ProcessorFormatter`` renders JSON lines
(production, for log shippers) or readable console lines (development). structlog loggers
(``structlog.get_logger()``) and plain ``logging.getLogger()`` users — ours, uvicorn's, RQ's — pass
through the same processors, so every line carries the same keys and the context variables bound with
``structlog.contextvars.bind_contextvars`` (``request_id`` in the API, ``job_id`` in the worker).
Values come from clients too (a URL path, a header): readable lines escape their control characters
(``\x1b``, ``\n``), so none can drive the terminal or forge a line; JSON lines escape them by nature.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, Final, TextIO

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

REDACTED: Final = "[REDACTED]"

# Key fragments whose values are secrets wherever they appear (``webhook_secret``, ``x-api-key``,
# ``proxy-authorization``...). Matched on the lower-cased key with "-" read as "_".
_SENSITIVE_FRAGMENTS: Final = (
    "authorization",
    "api_key",
    "apikey",
    "secret",
    "password",
    "passwd",
    "credential",
    "private_key",
    "signing_key",
    "cookie",
)
# Secrets inside free text: bearer/basic credentials, Standard Webhooks keys, passwords in URLs
# (``redis://:pw@host``). Applied to every string value, the message and formatted tracebacks included.
_SECRET_PATTERNS: Final = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {REDACTED}"),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), f"whsec_{REDACTED}"),
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*):[^/\s@]+@"), rf"\1:{REDACTED}@"),
    # key=value in query strings and messages: ?token=..., password=...
    (
        re.compile(r"(?i)\b([\w-]*(?:password|passwd|secret|token|api[_-]?key))=[^\s&;,]+"),
        rf"\1={REDACTED}",
    ),
)
_MAX_DEPTH: Final = 6

# Loggers that install their own handlers (uvicorn's default log config, RQ's worker setup); we take
# their handlers away and let them propagate to ours.
_FOREIGN_LOGGERS: Final = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "rq.worker",
    "rq.job",
    "rq.scheduler",
)
# The API writes its own access line (with route template and request id); uvicorn's would duplicate it.
_SILENCED_LOGGERS: Final = ("uvicorn.access",)


def is_sensitive_key(key: str) -> bool:
    """Whether values under ``key`` must never be logged. ``token`` counts only as a whole word part
    (``access_token``), so ``max_tokens``-style counters stay readable."""
    normalized = key.lower().replace("-", "_")
    if normalized in ("auth", "token") or normalized.endswith("_token"):
        return True
    return any(fragment in normalized for fragment in _SENSITIVE_FRAGMENTS)


# Every pattern above needs one of these substrings: one scan of a string rules all four out, and nearly
# every logged string (event names, routes, ids, statuses) has none of them.
_MAYBE_SECRET: Final = re.compile(r"(?i)bearer|basic|whsec_|://|=")


def _redact_text(text: str) -> str:
    if not _MAYBE_SECRET.search(text):
        return text
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _redact_text(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and is_sensitive_key(k) else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if type(value) in (list, tuple):  # not subclasses: a namedtuple cannot be rebuilt from one iterable
        # A (name, value) header pair: judge the value by the name.
        if len(value) == 2 and isinstance(value[0], str | bytes):
            name = value[0].decode("latin-1") if isinstance(value[0], bytes) else value[0]
            if is_sensitive_key(name):
                return type(value)((value[0], REDACTED)) if isinstance(value, tuple) else [value[0], REDACTED]
        return type(value)(_redact(item, depth + 1) for item in value)
    return value


def redact_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: blank values of secret-looking keys, at any nesting depth, and scrub
    credentials out of strings. Defence in depth: callers should not log secrets in the first place."""
    for key, value in list(event_dict.items()):
        if key.startswith("_") or key in ("exc_info", "stack_info"):
            continue  # structlog's own bookkeeping (the LogRecord, the exception object)
        event_dict[key] = REDACTED if is_sensitive_key(key) else _redact(value)
    return event_dict


# Characters a terminal acts on rather than prints: C0 and C1 controls, DEL, and the bidirectional
# overrides and isolates (which reorder what follows them). A request path, a header or a prompt can
# carry any of them; in a readable log they would move the cursor, recolour, retitle the terminal or
# forge a line. (JSON lines escape the controls already.)
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Fields whose line breaks are meant (a traceback, a stack): only their other controls are escaped.
_MULTILINE_KEYS: Final = frozenset({"exception", "stack"})


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_control_characters(text: str, *, keep_line_breaks: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\n``): printable."""
    if keep_line_breaks:
        return "\n".join(_CONTROL.sub(_escape_control, line) for line in text.split("\n"))
    return _CONTROL.sub(_escape_control, text)


def _escape_controls(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor for readable lines: escape control characters in every string value."""
    for key, value in event_dict.items():
        if isinstance(value, str) and not key.startswith("_"):
            event_dict[key] = escape_control_characters(value, keep_line_breaks=key in _MULTILINE_KEYS)
    return event_dict


def _drop_formatter_artifacts(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Drop ``message``/``asctime``, which another handler's formatter (pytest's, Sentry's) may have set
    on a stdlib record before ours ran: ``ExtraAdder`` would report them as extras. Neither can be a
    real extra (stdlib refuses both names in ``extra=``). Also uvicorn's ``color_message``: the same
    message with ANSI escape codes, for uvicorn's own coloured formatter; in our lines it is noise."""
    if "_record" in event_dict:
        event_dict.pop("message", None)
        event_dict.pop("asctime", None)
        event_dict.pop("color_message", None)
    return event_dict


def _shared_processors() -> list[Processor]:
    """Processors every line passes, whether it started in structlog or in stdlib ``logging``."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        _drop_formatter_artifacts,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        redact_secrets,
    ]


def _renderers(environment: str, stream: TextIO) -> list[Processor]:
    if environment == "development":
        colors = bool(getattr(stream, "isatty", lambda: False)())
        # Plain tracebacks: the rich formatter structlog picks when rich is installed prints local
        # variables, which is exactly where a secret sits when something fails.
        return [
            _escape_controls,
            structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback),
        ]
    # Tracebacks become one "exception" string field of the JSON line; scrub it like any other string.
    return [structlog.processors.format_exc_info, redact_secrets, structlog.processors.JSONRenderer()]


class _DarkroomHandler(logging.StreamHandler[TextIO]):
    """Our root handler, a distinct class so reconfiguring finds and replaces it (and only it)."""


def configure_logging(environment: str, level: str = "INFO", *, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging through one formatter; call once at process start.

    ``environment`` is ``Settings.environment``: ``"production"`` writes JSON lines, ``"development"``
    readable console lines. ``stream`` defaults to stderr (tests pass a buffer). Safe to call again:
    the previous handler is replaced, never stacked, and handlers others attached to the root logger
    (pytest's capture, for one) are left alone.
    """
    if environment not in ("development", "production"):
        raise ValueError(f"environment must be 'development' or 'production', not {environment!r}")
    numeric_level = logging.getLevelNamesMapping().get(level.upper())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}")
    stream = stream if stream is not None else sys.stderr

    shared = _shared_processors()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        # Not cached: a module-level logger used before this call (an import-time warning, a test)
        # would otherwise keep the old configuration for the life of the process.
        cache_logger_on_first_use=False,
    )

    handler = _DarkroomHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *_renderers(environment, stream),
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _DarkroomHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)

    for name in _FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        foreign.handlers.clear()
        foreign.propagate = True
        foreign.setLevel(logging.WARNING if name in _SILENCED_LOGGERS else logging.NOTSET)
