"""Server-Sent Events: a small spec-following decoder and the typed events of a generation job.

The decoder is hand-written (about thirty lines of the WHATWG algorithm) so the client needs nothing beyond
httpx; it is fed one line at a time, which lets the caller check its deadline on every line — including the
server's ``: ping`` comments — instead of blocking inside a library's iterator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from schemas.generation import NORMALIZED_CONTEXT
from schemas.jobs import Job, JobStatus, Progress


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched SSE message, undecoded."""

    event: str
    data: str
    id: str | None
    retry_ms: int | None


class SSEDecoder:
    """Turns lines (without their line break) into :class:`ServerSentEvent`\\s per the WHATWG rules."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._retry: int | None = None
        self.last_event_id: str | None = None  # survives across messages, as the spec's "last event ID"

    def feed(self, line: str) -> ServerSentEvent | None:
        """Consume one line; returns a message when a blank line completes one."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):  # comment (the server's keep-alive ping)
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        event, data, retry = self._event, self._data, self._retry
        self._event, self._data, self._retry = "", [], None
        if not data:  # e.g. a bare "retry:" block: nothing to deliver
            return None
        return ServerSentEvent(event or "message", "\n".join(data), self.last_event_id, retry)


@dataclass(frozen=True)
class Event:
    """A job event: ``status`` (with ``status``), ``progress`` (with ``progress``) or ``job`` (with ``job``).

    ``data`` keeps the decoded JSON, so kinds this client does not know yet still reach the caller.
    """

    type: str
    data: Any
    id: str | None = None
    status: JobStatus | None = None
    progress: Progress | None = None
    job: Job | None = None

    @classmethod
    def from_sse(cls, message: ServerSentEvent, data: Any) -> Event:
        """Type the payload of the kinds we know.

        ``status``/``progress`` are hints (the final job is what counts), so one this client cannot read (a
        status added by a newer server) is passed on untyped. A ``job`` it cannot read raises: that is the
        result, and dropping it silently would look like a job that never finished.
        """
        fields: dict[str, Any] = {}
        if message.event == "job":
            fields["job"] = Job.model_validate(data, context=NORMALIZED_CONTEXT)
        try:
            if message.event == "status":
                fields["status"] = JobStatus(data["status"])
            elif message.event == "progress":
                fields["progress"] = Progress.model_validate(data)
        except (KeyError, TypeError, ValueError, ValidationError):
            pass
        return cls(type=message.event, data=data, id=message.id, **fields)
