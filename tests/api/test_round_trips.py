"""What a job's requests cost Redis in round trips (issue #17: Redis spends ~20-30 µs of CPU on each, besides
its commands), and that they answer as before where their commands now share one round trip:

- a ``GET`` of a job takes its read token in the read's own pipeline: still refused with 429
  ``rate_limited`` (the read discarded), still served at ``maxmemory`` (uncounted), still counted after
  Redis lost its scripts;
- the end of a ``Prefer: wait`` gives its lease back in the final read's pipeline, and a lease Redis
  refuses to give back still leaves the answer as it was;
- the OpenAI route reads its finished job once, for its answer and its images;
- an event stream takes its read token with the job's first read.

Real Redis, the API under uvicorn in-process, no worker: jobs are finished through the real lifecycle
(``tests.fixtures.finished``). Round trips are Redis's own count of the reads it served on client sockets
(``INFO stats`` ``total_reads_processed``; a pipeline is one).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import redis

from api.main import create_app
from api.waits import lease_key
from schemas.problems import PROBLEM_CONTENT_TYPE
from services.rate_limit import READ_BUCKETS
from services.settings import Settings
from services.storage import FileStorage
from tests.api import serve
from tests.fixtures.finished import PNG, finish_job
from tests.fixtures.redis import RedisServerFactory

BODY = {"prompt": "a fox", "width": 512, "height": 512}
PRINCIPAL = "anonymous"  # authentication off


@contextmanager
def _api(redis_url: str, tmp_path: Path, **overrides: Any) -> Iterator[tuple[httpx.Client, FileStorage]]:
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path / 'outputs'}",
        auth_disabled=True,
        rate_limit_per_minute=0,  # the submissions' bucket: not what these tests count
        # The stranded-job sweep runs once at start-up, then stays quiet while round trips are counted.
        heartbeat_interval=timedelta(seconds=60),
        lost_after=timedelta(seconds=180),
        **overrides,
    )
    with serve(create_app(settings), lifespan="on") as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, FileStorage(tmp_path / "outputs")


def _finished_job(client: httpx.Client, store: redis.Redis, storage: FileStorage, **headers: str) -> str:
    answer = client.post("/v1/generations", json=BODY, headers=headers)
    assert answer.status_code == 202, answer.text
    job_id = str(answer.json()["id"])
    finish_job(store, storage, job_id)
    return job_id


def _round_trips(store: redis.Redis, request: Callable[[], httpx.Response]) -> tuple[int, httpx.Response]:
    """The round trips Redis served while ``request`` ran; the fewest of three runs (anything else the
    process does meanwhile only adds)."""
    counts, answer = [], None
    for _ in range(3):
        before = int(store.info("stats")["total_reads_processed"])
        answer = request()
        counts.append(int(store.info("stats")["total_reads_processed"]) - before - 1)  # less our INFO
    assert answer is not None
    return min(counts), answer


def _tokens(store: redis.Redis) -> float:
    return float(store.hget(READ_BUCKETS + PRINCIPAL, "tokens") or "nan")


#: A read bucket that refills too slowly (one token a minute) to blur what each GET takes.
SLOW_READS = {"read_rate_limit_per_minute": 1, "read_rate_limit_burst": 100}


# --- GET of a job -----------------------------------------------------------------------------------------


def test_a_get_of_a_finished_job_is_one_round_trip_its_read_token_included(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    with _api(redis_url, tmp_path, **SLOW_READS) as (client, storage):
        job_id = _finished_job(client, redis_client, storage)
        client.get(f"/v1/generations/{job_id}")  # the pool's connection made
        before = _tokens(redis_client)
        trips, answer = _round_trips(redis_client, lambda: client.get(f"/v1/generations/{job_id}"))
    assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text
    assert trips == 1  # was 2: the token's script, then the read
    assert before - _tokens(redis_client) > 2.99  # each of the 3 GETs took its token


def test_a_get_over_the_read_limit_is_429_problem_json_before_a_404_and_the_read_is_discarded(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    limits = {"read_rate_limit_per_minute": 1, "read_rate_limit_burst": 3}
    with _api(redis_url, tmp_path, **limits) as (client, storage):
        job_id = _finished_job(client, redis_client, storage)
        answers = [
            client.get(f"/v1/generations/{job_id}"),
            client.get("/v1/generations/gen_" + "0" * 32),  # unknown: 404, and it costs a token
            client.get("/v1/generations/not-an-id"),  # malformed: 404 without a read, and a token
            client.get(f"/v1/generations/{job_id}"),
            client.get("/v1/generations/not-an-id"),
        ]
    assert [a.status_code for a in answers] == [200, 404, 404, 429, 429], [a.text for a in answers]
    for refused in answers[3:]:
        assert refused.headers["content-type"] == PROBLEM_CONTENT_TYPE
        problem = refused.json()
        assert problem["code"] == "rate_limited"
        assert problem["detail"].startswith("too many reads for this API key; retry in ")
        assert int(refused.headers["retry-after"]) >= 1


def test_a_get_after_redis_lost_its_scripts_still_takes_its_token(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    with _api(redis_url, tmp_path, **SLOW_READS) as (client, storage):
        job_id = _finished_job(client, redis_client, storage)
        client.get(f"/v1/generations/{job_id}")
        before = _tokens(redis_client)
        redis_client.script_flush()  # as a restarted or newly promoted Redis has none
        flushed = client.get(f"/v1/generations/{job_id}")
        taken = before - _tokens(redis_client)
        again = client.get(f"/v1/generations/{job_id}")  # the script is there again
    assert flushed.status_code == 200 and again.status_code == 200, (flushed.text, again.text)
    assert 0.99 < taken < 1.01  # one token: the refused EVALSHA took none, the script call one
    assert 1.99 < before - _tokens(redis_client) < 2.01


def test_a_get_while_redis_is_full_is_served_uncounted(
    fresh_redis_server: RedisServerFactory, tmp_path: Path
) -> None:
    server = fresh_redis_server(appendonly=False)
    store = redis.Redis.from_url(server.url)
    with _api(server.url, tmp_path, **SLOW_READS) as (client, storage):
        job_id = _finished_job(client, store, storage)
        client.get(f"/v1/generations/{job_id}")
        before = _tokens(store)
        _fill(store)
        try:
            answer = client.get(f"/v1/generations/{job_id}")
        finally:
            store.config_set("maxmemory", 0)
    assert answer.status_code == 200 and answer.json()["id"] == job_id, answer.text
    assert _tokens(store) == before  # the bucket's write was refused: the read went ahead uncounted


def _fill(store: redis.Redis) -> None:
    """Make Redis refuse writes as a full one does (as tests/worker/test_redis_full.py does)."""
    store.config_set("maxmemory-policy", "noeviction")
    for i in range(64):
        store.set(f"filler:{i}", b"x" * 65536)
    store.config_set("maxmemory", int(store.info("memory")["used_memory"]) // 2)


# --- the end of a Prefer: wait ------------------------------------------------------------------------------


def test_the_end_of_a_prefer_wait_gives_its_lease_back_in_the_final_reads_round_trip(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """An ``Idempotency-Key`` replay of a finished job, with ``Prefer: wait``: the lease, the admission
    (a replay), one XREAD that returns at once, then the lease's release and the final read together."""
    with _api(redis_url, tmp_path) as (client, storage):
        key = {"Idempotency-Key": "round-trips"}
        job_id = _finished_job(client, redis_client, storage, **key)
        waited = {**key, "Prefer": "wait=10"}
        client.post("/v1/generations", json=BODY, headers=waited)  # the waits' pool's connection made
        trips, answer = _round_trips(
            redis_client, lambda: client.post("/v1/generations", json=BODY, headers=waited)
        )
    assert answer.status_code == 200 and answer.json()["id"] == job_id, answer.text
    assert answer.headers["preference-applied"] == "wait=10"
    assert trips == 4  # was 5: the lease's ZREM had a round trip of its own
    assert redis_client.zcard(lease_key(PRINCIPAL)) == 0  # given back


def test_a_lease_redis_refuses_to_give_back_leaves_the_answer_as_it_was(
    fresh_redis_server: RedisServerFactory, tmp_path: Path
) -> None:
    """The API's Redis user may not ``ZREM``: the release riding with the final read is refused, the read
    is not, and each wait answers its 200 all the same. The process gives its own count back (one wait at
    a time here: the second would be 503 ``server_busy`` otherwise); Redis's lease is left to expire."""
    server = fresh_redis_server(appendonly=False)
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser("api", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-zrem"])
    api_url = server.url.replace("redis://", "redis://api:secret@", 1)
    with _api(api_url, tmp_path, max_waits=1) as (client, storage):
        key = {"Idempotency-Key": "refused-release"}
        job_id = _finished_job(client, admin, storage, **key)
        waited = {**key, "Prefer": "wait=10"}
        answers = [client.post("/v1/generations", json=BODY, headers=waited) for _ in range(2)]
    for answer in answers:
        assert answer.status_code == 200 and answer.json()["id"] == job_id, answer.text
    assert admin.zcard(lease_key(PRINCIPAL)) == 2  # both refused: they expire


def test_an_openai_call_reads_its_job_once_for_the_answer_and_its_images(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A replay (same ``Idempotency-Key``) of a call whose job has finished since: the lease, the admission,
    one XREAD, then one read that gives the lease back and serves both the answer and its images' keys."""
    with _api(redis_url, tmp_path, openai_images_wait=timedelta(seconds=1)) as (client, storage):
        call = {"json": {"prompt": "a fox", "size": "1024x1024"}, "headers": {"Idempotency-Key": "openai"}}
        first = client.post("/v1/images/generations", **call)
        assert first.status_code == 504, first.text  # no worker: the job is still queued after 1 s
        job_id = first.headers["location"].rsplit("/", 1)[-1]
        finish_job(redis_client, storage, job_id)
        client.post("/v1/images/generations", **call)
        trips, answer = _round_trips(redis_client, lambda: client.post("/v1/images/generations", **call))
    assert answer.status_code == 200, answer.text
    assert answer.json()["id"] == job_id
    [image] = answer.json()["data"]
    assert base64.b64decode(image["b64_json"]) == PNG
    assert trips == 4  # was 6: the lease's ZREM, and a second read of the job for its images' keys
    assert redis_client.zcard(lease_key(PRINCIPAL)) == 0


# --- an event stream --------------------------------------------------------------------------------------


def test_an_event_stream_takes_its_read_token_with_its_first_read(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A finished job's stream (no per-key share, so no lease): the token with the job's first read, the
    read of the final job, one XREAD of its events — the token's script had a round trip of its own."""
    limits = {"max_waits_per_key": 0, **SLOW_READS}
    with _api(redis_url, tmp_path, **limits) as (client, storage):
        job_id = _finished_job(client, redis_client, storage)
        client.get(f"/v1/generations/{job_id}/events")  # the waits' pool's connection made
        before = _tokens(redis_client)
        trips, answer = _round_trips(redis_client, lambda: client.get(f"/v1/generations/{job_id}/events"))
    assert answer.status_code == 200 and "event: job" in answer.text, answer.text
    assert trips == 3  # was 4
    assert before - _tokens(redis_client) > 2.99  # each of the 3 streams took its token


def test_an_event_stream_over_the_read_limit_is_429_before_a_404(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    limits = {"read_rate_limit_per_minute": 1, "read_rate_limit_burst": 2}
    with _api(redis_url, tmp_path, **limits) as (client, storage):
        job_id = _finished_job(client, redis_client, storage)
        answers = [
            client.get(f"/v1/generations/{job_id}/events"),
            client.get("/v1/generations/not-an-id/events"),
            client.get("/v1/generations/not-an-id/events"),
        ]
    assert [a.status_code for a in answers] == [200, 404, 429], [a.text for a in answers]
    assert answers[2].headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert answers[2].json()["code"] == "rate_limited"
