"""The archiver against a real Redis and real storage (a folder, moto's S3): what it archives, when, and
what it leaves in Redis; crashes and a second archiver."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from redis import Redis

from services.jobs import JobStore, Lifecycle, utcnow
from services.jobs.archive import JobArchive, batch_object_key, job_object_key, snapshot_job, sweep_files
from services.jobs.archiver import Archiver, webhooks_settled
from services.jobs.keys import ARCHIVE_DUE, batch_key, events_key, items_key, job_key, webhooks_key
from services.storage import FileStorage, Storage, storage_from_url
from tests.fixtures.finished import finish_job, finished_job, queued_batch
from tests.fixtures.jobs import queued_job
from tests.fixtures.s3 import S3Bucket

RETENTION = timedelta(days=7)
TTL = timedelta(seconds=120)
HOOK = {"url": "https://hooks.example/x", "events": ["generation.succeeded"]}


@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "store")


def archiver_on(redis: Redis, storage: Storage, batch_size: int = 100) -> Archiver:
    archive = JobArchive(storage, RETENTION)
    return Archiver(redis=redis, archive=archive, finished_ttl=TTL, batch_size=batch_size)


def due(redis: Redis) -> dict[str, float]:
    return {member.decode(): score for member, score in redis.zrange(ARCHIVE_DUE, 0, -1, withscores=True)}


def make_due_now(redis: Redis, member: str) -> None:
    redis.zadd(ARCHIVE_DUE, {member: 0}, xx=True)


def test_a_finished_job_is_archived_then_its_keys_expire_soon(
    redis_client: Redis, storage: FileStorage
) -> None:
    record = finished_job(redis_client, storage)
    assert f"job:{record.id}" in due(redis_client)  # the terminal transition marked it
    before = snapshot_job(redis_client, record.id)

    assert archiver_on(redis_client, storage).run_once() == 1

    assert due(redis_client) == {}
    for key in (job_key(record.id), events_key(record.id)):
        assert 0 < redis_client.ttl(key) <= TTL.total_seconds()
    archived = JobArchive(storage, RETENTION).job(record.id)
    assert archived is not None and archived.record == record
    assert before is not None
    assert [(e["id"], e["type"], e["data"]) for e in before["events"]] == [
        (entry_id, event["type"], event["data"]) for entry_id, event in archived.events
    ]
    statuses = [event["data"]["status"] for _, event in archived.events if event["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert [event["data"]["step"] for _, event in archived.events if event["type"] == "progress"] == [1, 2, 3]
    assert archived.events_after(archived.events[1][0]) == archived.events[2:]


def test_a_job_still_running_is_not_marked(redis_client: Redis, storage: FileStorage) -> None:
    record = finished_job(redis_client, storage)
    redis_client.delete(ARCHIVE_DUE)
    queued_job(redis_client)
    assert due(redis_client) == {}
    assert archiver_on(redis_client, storage).run_once() == 0
    assert redis_client.ttl(job_key(record.id)) > TTL.total_seconds()


def test_a_pending_delivery_holds_the_archive_until_it_is_final(
    redis_client: Redis, storage: FileStorage
) -> None:
    record = finished_job(redis_client, storage, webhook=HOOK)
    archiver = archiver_on(redis_client, storage)
    member = f"job:{record.id}"

    # The outbox dispatcher has not made the terminal event's delivery record yet: wait for it.
    assert archiver.run_once() == 0
    assert due(redis_client)[member] > time.time() * 1000
    assert not storage.exists(job_object_key(record.id))

    store = JobStore(redis_client, RETENTION)
    delivery = {"event": "generation.succeeded", "msg_id": "msg_1", "state": "pending", "attempts": []}
    store.add_delivery(record.id, "msg_1", {**delivery, "created_at": utcnow().isoformat()})
    make_due_now(redis_client, member)
    assert archiver.run_once() == 0  # pending: still held
    assert not storage.exists(job_object_key(record.id))
    assert redis_client.ttl(job_key(record.id)) > TTL.total_seconds()

    store.put_delivery(record.id, "msg_1", {**delivery, "state": "delivered", "created_at": "t"})
    make_due_now(redis_client, member)
    assert archiver.run_once() == 1
    archived = JobArchive(storage, RETENTION).job(record.id)
    assert archived is not None and [d["state"] for d in archived.deliveries] == ["delivered"]
    assert 0 < redis_client.ttl(webhooks_key(record.id)) <= TTL.total_seconds()


@pytest.mark.parametrize(
    ("deliveries", "awaited", "settled"),
    [
        ([], [], True),
        ([], ["generation.succeeded"], False),
        ([{"event": "generation.started", "state": "delivered"}], ["generation.succeeded"], False),
        ([{"event": "generation.succeeded", "state": "failed"}], ["generation.succeeded"], True),
        ([{"event": "generation.started", "state": "gone"}], ["generation.succeeded"], True),
        ([{"event": "generation.succeeded", "state": "pending"}], ["generation.succeeded"], False),
        ([{"event": "generation.started", "state": "pending"}], [], False),
        (
            [{"event": "generation.succeeded", "state": "delivered"}],
            ["generation.succeeded", "generation.started"],
            False,
        ),
        (
            [
                {"event": "generation.started", "state": "delivered"},
                {"event": "generation.succeeded", "state": "delivered"},
            ],
            ["generation.succeeded", "generation.started"],
            True,
        ),
    ],
)
def test_webhooks_settled(deliveries: list[dict[str, str]], awaited: list[str], settled: bool) -> None:
    assert webhooks_settled(list(deliveries), awaited) is settled


def test_a_crash_between_write_and_trim_is_redone_safely(redis_client: Redis, storage: FileStorage) -> None:
    record = finished_job(redis_client, storage)
    archive = JobArchive(storage, RETENTION)
    # What a crashed archiver leaves: the object written, the keys untouched, the entry still due.
    document = snapshot_job(redis_client, record.id)
    assert document is not None
    archive.put(document)
    assert redis_client.ttl(job_key(record.id)) > TTL.total_seconds()

    restarted = archiver_on(redis_client, storage)  # another archiver (or the one restarted)
    assert restarted.run_once() == 1

    assert due(redis_client) == {}
    assert 0 < redis_client.ttl(job_key(record.id)) <= TTL.total_seconds()
    rewritten = json.loads(storage.read(job_object_key(record.id)))
    assert {**rewritten, "archived_at": ""} == {**document, "archived_at": ""}
    # The keys expire; a late rerun finds nothing to do, and the archive is still there.
    redis_client.delete(job_key(record.id), events_key(record.id))
    redis_client.zadd(ARCHIVE_DUE, {f"job:{record.id}": 0})
    assert restarted.run_once() == 0
    assert due(redis_client) == {} and archive.job(record.id) is not None


def test_two_archivers_do_not_both_work(redis_client: Redis, storage: FileStorage) -> None:
    ids = [finished_job(redis_client, storage).id for _ in range(30)]
    first = archiver_on(redis_client, storage, batch_size=10)
    second = archiver_on(redis_client, storage, batch_size=10)
    assert first.run_once() == 10
    assert second.run_once() == 0  # the lease is the first's
    assert len(due(redis_client)) == 20

    counts = {"first": 0, "second": 0}
    start = threading.Barrier(2)

    def work(name: str, archiver: Archiver) -> None:
        start.wait()
        for _ in range(5):
            counts[name] += archiver.run_once()

    threads = [threading.Thread(target=work, args=pair) for pair in (("first", first), ("second", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts == {"first": 20, "second": 0}
    first.release_lease()
    assert second.hold_lease()  # handed over once released
    assert all(storage.exists(job_object_key(job_id)) for job_id in ids)


def test_batch_items_wait_for_their_batch_then_all_leave(redis_client: Redis, storage: FileStorage) -> None:
    batch_id, items = queued_batch(redis_client, 3)
    archiver = archiver_on(redis_client, storage)
    finish_job(redis_client, storage, items[0])
    assert archiver.run_once() == 0  # its batch is still running: dropped, re-added by the batch
    assert due(redis_client) == {}
    for item in items[1:]:
        finish_job(redis_client, storage, item)
    assert set(due(redis_client)) == {f"job:{items[1]}", f"job:{items[2]}", f"batch:{batch_id}"}

    while archiver.run_once():
        pass

    assert due(redis_client) == {}
    archived = JobArchive(storage, RETENTION).batch(batch_id)
    assert archived is not None and archived.item_ids == items
    assert archived.statuses == ["succeeded"] * 3 and archived.record.counted["succeeded"] == 3
    assert redis_client.hexists(batch_key(batch_id), "archived_at")
    for key in (batch_key(batch_id), items_key(batch_id), *(job_key(item) for item in items)):
        assert 0 < redis_client.ttl(key) <= TTL.total_seconds()
    assert all(storage.exists(job_object_key(item)) for item in items)
    assert storage.exists(batch_object_key(batch_id))


def test_past_retention_reads_none(redis_client: Redis, storage: FileStorage) -> None:
    record = finished_job(redis_client, storage)
    archiver_on(redis_client, storage).run_once()
    archive = JobArchive(storage, RETENTION)
    assert record.completed_at is not None
    assert archive.job(record.id, now=record.completed_at + RETENTION - timedelta(seconds=1)) is not None
    assert archive.job(record.id, now=record.completed_at + RETENTION) is None


def test_the_archive_works_on_s3(redis_client: Redis, s3_bucket_url: S3Bucket) -> None:
    storage = storage_from_url(s3_bucket_url.storage_url, s3_endpoint_url=s3_bucket_url.endpoint_url)
    record = finished_job(redis_client, storage)
    assert archiver_on(redis_client, storage).run_once() == 1
    listed = s3_bucket_url.client().list_objects_v2(Bucket=s3_bucket_url.bucket, Prefix="outputs/records/")
    assert [item["Key"] for item in listed["Contents"]] == [f"outputs/records/jobs/{record.id}.json"]
    archived = JobArchive(storage, RETENTION).job(record.id)
    assert archived is not None and archived.record == record


def test_sweep_removes_file_archives_past_retention(redis_client: Redis, storage: FileStorage) -> None:
    old, new = finished_job(redis_client, storage), finished_job(redis_client, storage)
    archiver_on(redis_client, storage).run_once()
    path = storage.path_for(job_object_key(old.id))
    aged = time.time() - (RETENTION + timedelta(days=2)).total_seconds()
    os.utime(path, (aged, aged))
    assert sweep_files(storage.root, RETENTION) == 1
    assert not storage.exists(job_object_key(old.id)) and storage.exists(job_object_key(new.id))


def test_every_way_a_job_ends_marks_it_once(redis_client: Redis, storage: FileStorage) -> None:
    lifecycle = Lifecycle(redis_client, RETENTION)
    canceled, unserved = queued_job(redis_client), queued_job(redis_client)
    assert lifecycle.cancel_queued(canceled.id, "canceled while queued").applied
    assert lifecycle.fail_unserved(unserved.id, "nobody serves it").applied
    assert not lifecycle.cancel_queued(canceled.id, "again").applied  # refused: no second mark
    assert set(due(redis_client)) == {f"job:{canceled.id}", f"job:{unserved.id}"}
    assert archiver_on(redis_client, storage).run_once() == 2
    archived = JobArchive(storage, RETENTION).job(unserved.id)
    assert archived is not None and archived.record.error is not None
    assert archived.record.error["type"] == "model_unavailable"


def test_a_delivery_pending_for_half_the_retention_no_longer_holds_the_record(
    redis_client: Redis, storage: FileStorage
) -> None:
    """Rather than lose the record with its Redis keys, it is archived with the delivery still pending."""
    record = finished_job(redis_client, storage, webhook=HOOK, at=utcnow() - RETENTION / 2)
    delivery = {"event": "generation.succeeded", "msg_id": "msg_1", "state": "pending", "attempts": []}
    JobStore(redis_client, RETENTION).add_delivery(record.id, "msg_1", {**delivery, "created_at": "t"})
    assert archiver_on(redis_client, storage).run_once() == 1
    archived = JobArchive(storage, RETENTION).job(record.id)
    assert archived is not None and [d["state"] for d in archived.deliveries] == ["pending"]
