"""The SSE decoder follows the WHATWG rules the server's stream relies on; events come out typed."""

from __future__ import annotations

import pytest

from darkroom_client.events import Event, ServerSentEvent, SSEDecoder
from schemas.jobs import JobStatus, Progress


def decode(text: str) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    messages = [decoder.feed(line) for line in text.split("\n")]
    return [message for message in messages if message is not None]


def test_fields_comments_ids_and_multiline_data() -> None:
    stream = (
        "retry: 2000\n\n"  # no data: nothing dispatched
        ": ping\n\n"
        'id: 1-0\nevent: status\ndata: {"status": "queued"}\n\n'
        'event: progress\ndata:{"step": 1,\ndata: "total": 4}\n\n'  # no space after colon; two data lines
        "id: 2-0\ndata: plain\n\n"
        "id: bad\0id\ndata: x\n\n"  # an id with NUL is ignored
    )
    assert decode(stream) == [
        ServerSentEvent("status", '{"status": "queued"}', "1-0", None),
        ServerSentEvent("progress", '{"step": 1,\n"total": 4}', "1-0", None),  # the id carries over
        ServerSentEvent("message", "plain", "2-0", None),
        ServerSentEvent("message", "x", "2-0", None),
    ]


def test_an_incomplete_message_is_not_dispatched() -> None:
    assert decode("event: job\ndata: {}") == []


def test_events_are_typed_and_unknown_ones_pass_through() -> None:
    status = Event.from_sse(ServerSentEvent("status", "", "1-0", None), {"status": "running", "at": "…"})
    assert status.status is JobStatus.RUNNING and status.id == "1-0"
    progress = Event.from_sse(ServerSentEvent("progress", "", None, None), {"step": 2, "total": 4})
    assert progress.progress == Progress(step=2, total=4)
    newer = Event.from_sse(ServerSentEvent("status", "", None, None), {"status": "paused"})
    assert newer.status is None and newer.data == {"status": "paused"}
    other = Event.from_sse(ServerSentEvent("heartbeat", "", None, None), {"n": 1})
    assert (other.type, other.data, other.job) == ("heartbeat", {"n": 1}, None)


def test_a_final_job_that_cannot_be_read_is_an_error_not_silence() -> None:
    with pytest.raises(ValueError):
        Event.from_sse(ServerSentEvent("job", "", None, None), {"id": "gen_1"})
