"""Reads of jobs and batches that have left Redis: the API answers from the archive exactly as before.

Real Redis, a file store, the API under uvicorn, the real archiver; jobs are run to their end through the
real lifecycle (``tests.fixtures.finished``). "Trimmed" is what the short TTL leaves: the keys deleted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from api.main import create_app
from services.api_keys import hash_key, new_key
from services.jobs import utcnow
from services.jobs.archive import JobArchive
from services.jobs.archiver import Archiver
from services.jobs.keys import (
    batch_key,
    batch_webhooks_key,
    events_key,
    items_key,
    job_key,
    owner_batches_key,
    webhooks_key,
)
from services.settings import Settings
from services.storage import FileStorage
from tests.api import serve
from tests.fixtures.finished import finish_job, finished_job, queued_batch

ALICE, BOB = new_key(), new_key()
RETENTION = timedelta(days=7)
_SIGNED = re.compile(r"\?expires=[0-9]+&signature=[A-Za-z0-9_=-]+")


@dataclass
class Api:
    url: str
    redis: Redis
    storage: FileStorage

    def client(self, key: str = ALICE) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=10)

    def archive_all(self) -> None:
        archiver = Archiver(
            redis=self.redis, archive=JobArchive(self.storage, RETENTION), finished_ttl=timedelta(minutes=5)
        )
        while archiver.run_once():
            pass
        archiver.release_lease()

    def trim(self, *keys: str) -> None:
        """What the short TTL does once it runs out."""
        self.redis.delete(*keys)


@pytest.fixture
def api(redis_url: str, redis_client: Redis, tmp_path: Path) -> Iterator[Api]:
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path}",
        api_keys=f"alice:sha256:{hash_key(ALICE)},bob:sha256:{hash_key(BOB)}",
        job_retention=RETENTION,
    )
    with serve(create_app(settings), lifespan="on") as url:
        yield Api(url=url, redis=redis_client, storage=FileStorage(tmp_path))


def unsigned(value: Any) -> str:
    """The answer with its URLs' signatures (fresh on every read) normalised."""
    text = value if isinstance(value, str) else httpx.Response(200, json=value).text
    return _SIGNED.sub("?signed", text)


def job_keys(job_id: str) -> list[str]:
    return [job_key(job_id), events_key(job_id), webhooks_key(job_id)]


def read_stream(client: httpx.Client, path: str, **headers: str) -> str:
    with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        return response.read().decode()


def test_a_trimmed_job_reads_as_before(api: Api) -> None:
    record = finished_job(api.redis, api.storage, owner="alice")
    path = f"/v1/generations/{record.id}"
    with api.client() as client:
        before = client.get(path)
        stream_before = read_stream(client, f"{path}/events")
        resumed_before = read_stream(client, f"{path}/events", **{"Last-Event-ID": _second_id(stream_before)})
        cancel_before = client.post(f"{path}/cancel")
    assert before.status_code == 200 and before.json()["status"] == "succeeded"

    api.archive_all()
    api.trim(*job_keys(record.id))
    assert not api.redis.exists(job_key(record.id))

    with api.client() as client:
        after = client.get(path)
        assert after.status_code == 200
        assert unsigned(after.json()) == unsigned(before.json())
        [image] = after.json()["images"]
        assert httpx.get(image["url"]).content == api.storage.read(record.images[0]["key"])  # URL works
        assert unsigned(read_stream(client, f"{path}/events")) == unsigned(stream_before)
        resumed = read_stream(client, f"{path}/events", **{"Last-Event-ID": _second_id(stream_before)})
        assert unsigned(resumed) == unsigned(resumed_before)
        cancel_after = client.post(f"{path}/cancel")
        assert (
            (cancel_after.status_code, cancel_after.json()["code"])
            == (
                cancel_before.status_code,
                cancel_before.json()["code"],
            )
            == (409, "job_already_finished")
        )
        # The archive object itself is never served as a file, signed URL or not.
        assert client.get(f"/v1/files/records/jobs/{record.id}.json").status_code == 404
    with api.client(BOB) as other:
        assert other.get(path).status_code == 404  # another key's job stays hidden
        assert other.post(f"{path}/cancel").status_code == 404


def _second_id(stream: str) -> str:
    return re.findall(r"^id: (\S+)$", stream, flags=re.M)[1]


def test_a_job_past_its_retention_is_404(api: Api) -> None:
    old = finished_job(api.redis, api.storage, owner="alice", at=utcnow() - RETENTION - timedelta(hours=1))
    api.archive_all()
    api.trim(*job_keys(old.id))
    with api.client() as client:
        for path in (f"/v1/generations/{old.id}", f"/v1/generations/{old.id}/events"):
            response = client.get(path)
            assert response.status_code == 404, path
            assert response.headers["content-type"] == "application/problem+json"


def test_a_trimmed_batch_and_its_pages_read_as_before(api: Api) -> None:
    batch_id, items = queued_batch(api.redis, 3, owner="alice")
    for item in items:
        finish_job(api.redis, api.storage, item)
    pages = [f"/v1/batches/{batch_id}?limit=2", f"/v1/batches/{batch_id}?offset=2&limit=2", "/v1/batches"]
    with api.client() as client:
        before = [client.get(page) for page in pages]
        items_before = [client.get(f"/v1/generations/{item}").json() for item in items]
    assert [response.status_code for response in before] == [200, 200, 200]
    assert len(before[0].json()["items"]) == 2 and before[0].json()["status"] == "completed"

    api.archive_all()
    api.trim(batch_key(batch_id), items_key(batch_id), batch_webhooks_key(batch_id))
    api.trim(*(key for item in items for key in job_keys(item)))

    with api.client() as client:
        after = [client.get(page) for page in pages]
        for was, now in zip(before, after, strict=True):
            assert now.status_code == 200
            assert unsigned(now.json()) == unsigned(was.json())
        for item, was in zip(items, items_before, strict=True):
            assert unsigned(client.get(f"/v1/generations/{item}").json()) == unsigned(was)
        canceled = client.post(f"/v1/batches/{batch_id}/cancel")
        assert (canceled.status_code, canceled.json()["code"]) == (409, "batch_already_finished")
    with api.client(BOB) as other:
        assert other.get(f"/v1/batches/{batch_id}").status_code == 404
        assert other.get("/v1/batches").json()["data"] == []


def test_a_batch_archived_but_not_yet_trimmed_reads_as_before(api: Api) -> None:
    """The minutes between the archive and the TTL: items may already be gone while the batch is not."""
    batch_id, items = queued_batch(api.redis, 2, owner="alice")
    for item in items:
        finish_job(api.redis, api.storage, item)
    path = f"/v1/batches/{batch_id}"
    with api.client() as client:
        before = client.get(path).json()
    api.archive_all()
    api.trim(*job_keys(items[0]))
    with api.client() as client:
        assert unsigned(client.get(path).json()) == unsigned(before)


def test_a_batch_past_its_retention_is_404_and_leaves_the_list(api: Api) -> None:
    old_id, old_items = queued_batch(api.redis, 2, owner="alice")
    for item in old_items:
        finish_job(api.redis, api.storage, item, at=utcnow() - RETENTION - timedelta(hours=1))
    kept_id, kept_items = queued_batch(api.redis, 1, owner="alice")
    finish_job(api.redis, api.storage, kept_items[0])
    api.archive_all()
    for batch_id, items in ((old_id, old_items), (kept_id, kept_items)):
        api.trim(batch_key(batch_id), items_key(batch_id), batch_webhooks_key(batch_id))
        api.trim(*(key for item in items for key in job_keys(item)))
    with api.client() as client:
        assert client.get(f"/v1/batches/{old_id}").status_code == 404
        assert client.get(f"/v1/generations/{old_items[0]}").status_code == 404
        listed = client.get("/v1/batches").json()["data"]
        assert [batch["id"] for batch in listed] == [kept_id]
    assert api.redis.zrange(owner_batches_key("alice"), 0, -1) == [batch_key(kept_id).encode()]
