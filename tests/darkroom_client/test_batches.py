"""``DarkroomClient``'s batch calls against the running stack: create (idempotent), read page by page, wait,
cancel, and errors as problems.

A recording transport (the real one underneath) shows how many pages a full read took.
"""

from __future__ import annotations

import time

import pytest

from darkroom_client import (
    Batch,
    BatchItemRequest,
    BatchStatus,
    BatchWaitTimeout,
    CreateBatch,
    DarkroomClient,
    DarkroomError,
    JobStatus,
)
from tests.darkroom_client.conftest import TINY, RecordingTransport
from tests.fixtures.stack import Stack


def tiny_batch(seeds: list[int]) -> CreateBatch:
    return CreateBatch(template=BatchItemRequest(**TINY), seeds=seeds)


def test_create_wait_and_read_a_batch_page_by_page(
    client_stack: Stack, client: DarkroomClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = client.create_batch(tiny_batch([21, 22, 23]), idempotency_key="three-foxes")
    assert created.id.startswith("batch_") and created.counts.total == 3
    assert client.create_batch(tiny_batch([21, 22, 23]), idempotency_key="three-foxes").id == created.id
    with pytest.raises(DarkroomError) as reused:
        client.create_batch(tiny_batch([24]), idempotency_key="three-foxes")
    assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")

    seen: list[Batch] = []
    done = client.wait_batch(created.id, timeout=60, on_progress=seen.append, poll_interval=0.1)
    assert (done.status, done.counts.succeeded, done.next_offset) == (BatchStatus.COMPLETED, 3, None)
    assert [item.images[0].seed for item in done.items or []] == [21, 22, 23]
    assert [item.id for item in done.items or []] == [item.id for item in created.items or []]
    assert seen[-1].status is BatchStatus.COMPLETED and len(seen) == len(
        {(b.status, str(b.counts)) for b in seen}
    )
    assert all(batch.items == [] for batch in seen)  # polled without items: the cheap read

    page = client.get_batch(created.id, offset=1, limit=1)
    assert [item.id for item in page.items or []] == [(done.items or [])[1].id] and page.next_offset == 2

    monkeypatch.setattr("darkroom_client.client.MAX_PAGE", 2)  # three items now take two pages
    transport = RecordingTransport()
    with DarkroomClient(client_stack.api_url, transport=transport) as paging:
        whole = paging.get_batch(created.id)
    assert [item.id for item in whole.items or []] == [item.id for item in done.items or []]
    assert whole.next_offset is None and transport.count(f"/v1/batches/{created.id}") == 2


def test_cancel_a_waiting_batch_after_wait_batch_gives_up(client: DarkroomClient, blocker: str) -> None:
    batch = client.create_batch(tiny_batch([31, 32]))  # the blocker holds the worker: both items wait
    started = time.monotonic()
    with pytest.raises(BatchWaitTimeout) as timed_out:
        client.wait_batch(batch, timeout=0.5, poll_interval=0.1)
    assert 0.5 <= time.monotonic() - started < 5.0
    assert timed_out.value.batch.id == batch.id and timed_out.value.batch.status is BatchStatus.QUEUED
    assert isinstance(timed_out.value, TimeoutError)

    canceled = client.cancel_batch(batch.id)
    assert canceled.status is BatchStatus.CANCELED and canceled.counts.canceled == 2
    assert {item.status for item in canceled.items or []} == {JobStatus.CANCELED}
    assert client.wait_batch(batch.id, timeout=5).status is BatchStatus.CANCELED  # already over: no wait
    with pytest.raises(DarkroomError) as again:
        client.cancel_batch(batch.id)
    assert (again.value.status, again.value.code) == (409, "batch_already_finished")


def test_batch_errors_are_problems(client: DarkroomClient) -> None:
    with pytest.raises(DarkroomError) as invalid:
        client.create_batch({"template": TINY, "seeds": [1, -1]})  # a mapping skips the local checks
    assert (invalid.value.status, invalid.value.code) == (422, "validation_error")
    assert [error.field for error in invalid.value.errors] == ["seeds.1"]

    with pytest.raises(DarkroomError) as missing:
        client.get_batch("batch_missing")
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    with pytest.raises(DarkroomError) as odd_id:
        client.cancel_batch("../../healthz")  # quoted into one path segment, never a different route
    assert odd_id.value.status == 404
