"""``DarkroomClient``'s batch calls against the running stack: create (idempotent), read page by page, wait
(riding out a 503 on its final read), cancel, list, and errors as problems.

A recording transport (the real one underneath) shows how many pages a full read took; a subclass answers
the first full reads with the API's own 503 problem, as it does while Redis is down.
"""

from __future__ import annotations

import time

import httpx
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
from tests.darkroom_client.conftest import TINY, UNSERVED_MODEL, RecordingTransport
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


class UnavailableFullReads(RecordingTransport):
    """The first ``failures`` full reads of a batch (``limit`` other than 0: what wait_batch ends with)
    get the 503 ``redis_unavailable`` problem the API sends while Redis is down; the rest reach the stack.
    (Stopping the package's shared Redis at that moment would work too, but puts every later test at risk.)
    """

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        full_read = request.url.path.startswith("/v1/batches/") and request.url.params.get("limit") != "0"
        if request.method == "GET" and full_read and self.failures:
            self.failures -= 1
            self.requests.append(f"503 {request.url.path}")
            problem = {
                "type": "urn:darkroom:problem:redis_unavailable",
                "title": "Service Unavailable",
                "status": 503,
                "detail": "The job store is temporarily unreachable; retry shortly.",
                "code": "redis_unavailable",
            }
            headers = {"Content-Type": "application/problem+json", "Retry-After": "1"}
            return httpx.Response(503, json=problem, headers=headers)
        return super().handle_request(request)


def test_wait_batch_rides_out_an_outage_on_its_final_read(client_stack: Stack) -> None:
    transport = UnavailableFullReads(failures=2)
    with DarkroomClient(client_stack.api_url, transport=transport) as client:
        batch = client.create_batch(tiny_batch([61]))
        done = client.wait_batch(batch, timeout=60, poll_interval=0.1)
    assert done.status is BatchStatus.COMPLETED and [item.status for item in done.items or []] == [
        JobStatus.SUCCEEDED
    ]
    assert transport.failures == 0 and transport.count(f"503 /v1/batches/{batch.id}") == 2


def test_list_batches_newest_first_page_by_page(client: DarkroomClient) -> None:
    # Batches for the model no worker serves stay queued: listing subjects that cost no GPU time.
    unserved = BatchItemRequest(**TINY, model=UNSERVED_MODEL)
    first = client.create_batch(CreateBatch(template=unserved, seeds=[1]))
    second = client.create_batch(CreateBatch(template=unserved, count=2))
    try:
        newest = client.list_batches()  # the default page: up to 20, newest first, no items
        assert [batch.id for batch in newest.data[:2]] == [second.id, first.id] and len(newest.data) <= 20
        assert [(batch.status, batch.counts.total, batch.counts.queued) for batch in newest.data[:2]] == [
            (BatchStatus.QUEUED, 2, 2),
            (BatchStatus.QUEUED, 1, 1),
        ]
        assert all(batch.items is None for batch in newest.data)
        assert newest.data[0].model == UNSERVED_MODEL

        page = client.list_batches(limit=1)
        assert [batch.id for batch in page.data] == [second.id] and page.next_offset == 1
        assert [batch.id for batch in client.list_batches(offset=1, limit=1).data] == [first.id]

        with pytest.raises(DarkroomError) as too_many:
            client.list_batches(limit=101)
        assert (too_many.value.status, too_many.value.code) == (422, "validation_error")
        assert [error.field for error in too_many.value.errors] == ["query.limit"]
    finally:
        for batch in (first, second):
            client.cancel_batch(batch.id)


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
