"""The ``Prefer`` request header (RFC 7240), of which we honour ``wait=N``.

RFC 7240 has servers ignore preferences they do not understand, and so do we: ``respond-async``,
``return=minimal`` or a preference of someone else's extension change nothing. A ``wait`` whose value is
not a number of seconds is another matter: the client asked for something we do understand, and wrote it
wrong (``wait=abc``, ``wait=1.5``, ``wait``). Ignoring it would answer 202 at once to a client that then
reads a queued job where it expected a finished one, so it gets 422 ``invalid_prefer_header`` instead.
"""

from __future__ import annotations

import re

from api.errors import UnprocessableRequest
from schemas.problems import FieldError

# One preference per comma, except inside a quoted string (RFC 7240: word = token / quoted-string).
_PREFERENCE = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+')
_SECONDS = re.compile(r"[0-9]+")  # delta-seconds; str.isdigit() would also take "²"
_MAX_DIGITS = 9  # more seconds than that are "as long as you allow" anyway: capped, not parsed


def _invalid(value: str) -> UnprocessableRequest:
    shown = value if len(value) <= 40 else value[:39] + "…"
    message = f"Prefer: wait={shown} is not a whole number of seconds; send e.g. 'Prefer: wait=30'"
    return UnprocessableRequest(
        message,
        code="invalid_prefer_header",
        errors=[FieldError(field="header.prefer", message=message, type="invalid_prefer_header")],
    )


def _wait_value(header: str) -> str | None:
    """The value of the first ``wait`` preference (RFC 7240: only the first instance counts), unquoted;
    ``None`` without one. A ``wait`` with no ``=`` is the empty string: malformed, not absent."""
    for element in _PREFERENCE.findall(header):
        name, _, value = element.split(";", 1)[0].partition("=")
        if name.strip().lower() == "wait":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def preferred_wait(header: str | None, max_wait_s: float) -> float:
    """Seconds the client is willing to wait, capped at ``max_wait_s``; 0 without a ``wait`` preference.

    Raises 422 ``invalid_prefer_header`` for a ``wait`` that is not a whole number of seconds; call it
    before the job is queued, so a refused request leaves nothing behind.
    """
    if not header:
        return 0.0
    value = _wait_value(header)
    if value is None:
        return 0.0
    if _SECONDS.fullmatch(value) is None:
        raise _invalid(value)
    if len(value) > _MAX_DIGITS:
        return max_wait_s
    return min(float(value), max_wait_s)
