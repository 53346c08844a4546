"""Issue #16, cases 3, 4, 5 and 9: one API key (A) attacks, another (B) keeps being served.

Each test runs the API under real uvicorn on a real Redis: A runs the attack from threads while B submits
and reads; B must see no 5xx and be admitted, A must be refused (429) by the limit that case adds. B's
p50/p99 are printed, not asserted beyond sanity bounds: timing targets belong in
``bench/isolation_admission.py``.
"""

from __future__ import annotations

import base64
import io
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from PIL import Image

from api.main import create_app
from services.api_keys import hash_key, new_key
from services.settings import Settings
from tests.api import serve

ALICE, BOB = new_key(), new_key()  # A attacks, B is the other tenant
BODY = {"prompt": "a fox", "width": 512, "height": 512, "num_inference_steps": 1}


def _settings(redis_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path}",
        api_keys=f"alice:sha256:{hash_key(ALICE)},bob:sha256:{hash_key(BOB)}",
        **overrides,
    )


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 255).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _attack(
    url: str, key: str, request: Callable[[httpx.Client], httpx.Response], seconds: float, threads: int = 2
) -> tuple[list[int], threading.Event, list[threading.Thread]]:
    """Threads looping ``request`` as key ``key`` until stopped (or ``seconds``); their statuses."""
    statuses: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        deadline = time.monotonic() + seconds
        with _client(url, key) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                statuses.append(request(client).status_code)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    return statuses, stop, workers


def _b_meanwhile(url: str, job_id: str, rounds: int, submit: bool = True) -> tuple[list[float], list[int]]:
    """B reads its job (and submits) ``rounds`` times: latencies (ms) and statuses."""
    latencies: list[float] = []
    statuses: list[int] = []
    with _client(url, BOB) as bob:
        for n in range(rounds):
            started = time.perf_counter()
            answer = (
                bob.post("/v1/generations", json=BODY)
                if submit and n % 4 == 0
                else bob.get(f"/v1/generations/{job_id}")
            )
            latencies.append((time.perf_counter() - started) * 1000)
            statuses.append(answer.status_code)
    return latencies, statuses


def _report(case: str, latencies: list[float], statuses: list[int], attacker: list[int]) -> None:
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"\n{case}: B p50 {statistics.median(latencies):.1f} ms p99 {cuts[98]:.1f} ms over {len(latencies)}"
        f" requests, B statuses {sorted(set(statuses))}; A {len(attacker)} requests,"
        f" {attacker.count(429)} answered 429, statuses {sorted(set(attacker))}"
    )


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[redis_lib.Redis]:
    connection = redis_lib.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.close()


def test_case3_heavy_invalid_images_are_decoded_off_the_loop_and_spend_tokens(
    redis_url: str, redis_conn: redis_lib.Redis, tmp_path: Path
) -> None:
    # A solid 4096² PNG (tens of KB, 16 M pixels to decode) and a mask of another size: refused, but only
    # after the key's token; B keeps its GETs and POSTs.
    hostile = {**BODY, "init_image": _png(4096, 4096), "mask_image": _png(4000, 4000)}
    settings = _settings(redis_url, tmp_path, rate_limit_per_minute=60, rate_limit_burst=20)
    with serve(create_app(settings), lifespan="on") as url:
        with _client(url, BOB) as bob:
            job_id = bob.post("/v1/generations", json=BODY).json()["id"]
        refused = _client(url, ALICE).post("/v1/generations", json=hostile)
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "mask_image"
        attacker, stop, workers = _attack(url, ALICE, lambda c: c.post("/v1/generations", json=hostile), 20)
        latencies, statuses = _b_meanwhile(url, job_id, 40)
        stop.set()
        for worker in workers:
            worker.join()
    _report("case 3", latencies, statuses, attacker)
    assert all(status < 500 for status in statuses) and set(statuses) <= {200, 202}
    assert attacker.count(429) > 0, "a key looping refused submissions must run out of tokens"
    assert all(status in (422, 429) for status in attacker)
    assert statistics.median(latencies) < 1000


def test_case4_a_batch_pays_for_what_it_stores_and_huge_ones_are_refused(
    redis_url: str, redis_conn: redis_lib.Redis, tmp_path: Path
) -> None:
    emoji = "\U0001f600" * 10_000
    settings = _settings(redis_url, tmp_path, batch_items_per_minute=600, batch_items_burst=1200)
    with serve(create_app(settings), lifespan="on") as url, _client(url, ALICE) as alice:
        before = int(redis_conn.info("memory")["used_memory"])
        huge = alice.post("/v1/batches", json={"template": {**BODY, "prompt": emoji}, "count": 1000})
        assert huge.status_code == 413 and huge.json()["code"] == "batch_too_large", huge.text
        assert int(redis_conn.info("memory")["used_memory"]) - before < 1_000_000  # nothing stored
        # A 200-item batch of a 2,000-emoji prompt: admitted, paid per item and per stored byte.
        moderate = {"template": {**BODY, "prompt": "\U0001f600" * 2000}, "count": 200}
        first = alice.post("/v1/batches", json=moderate)
        assert first.status_code == 202, first.text
        after = int(redis_conn.info("memory")["used_memory"])  # includes the script's spent arguments
        per_item = (after - before) / 200
        items = [
            i["id"]
            for i in alice.get(f"/v1/batches/{first.json()['id']}", params={"limit": 5}).json()["items"]
        ]
        keys = [k for i in items for k in (f"darkroom:job:{i}", f"darkroom:job:{i}:events", f"rq:job:{i}")]
        stored = sum(int(redis_conn.memory_usage(k) or 0) for k in keys) / len(items)
        # 1,200 batch tokens hold the first batch's 200 + 200 × 8,512 // 8,192 ... and not many more.
        refusals = [alice.post("/v1/batches", json=moderate).status_code for _ in range(6)]
        with _client(url, BOB) as bob:
            other = bob.post("/v1/batches", json=moderate)
    print(
        f"\ncase 4: Redis bytes per batch item {per_item:.0f} (before {before}, after {after}); "
        f"A's next batches {refusals}; B {other.status_code}"
    )
    assert stored < 24_000  # 2,000 emoji: 8 KB as UTF-8 (escaped JSON alone took 24 KB before)
    assert per_item < 24_000
    assert 429 in refusals and other.status_code == 202


def test_case5_a_key_holds_only_its_share_of_the_batch_queue(
    redis_url: str, redis_conn: redis_lib.Redis, tmp_path: Path
) -> None:
    settings = _settings(redis_url, tmp_path, max_batch_queue_depth=100, queue_share_per_key=0.5)
    with serve(create_app(settings), lifespan="on") as url, _client(url, ALICE) as alice:
        answers = [alice.post("/v1/batches", json={"template": BODY, "count": 20}) for _ in range(5)]
        codes = [a.status_code for a in answers]
        assert codes == [202, 202, 429, 429, 429], codes
        assert answers[2].json()["code"] == "queue_share_exceeded" and answers[2].headers["retry-after"]
        with _client(url, BOB) as bob:
            theirs = [
                bob.post("/v1/batches", json={"template": BODY, "count": 20}).status_code for _ in range(3)
            ]
            job = bob.post("/v1/generations", json=BODY)
        assert theirs[:2] == [202, 202] and job.status_code == 202
        # Cancelling frees the share at once (the lifecycle removes the items from it).
        assert alice.post(f"/v1/batches/{answers[0].json()['id']}/cancel").status_code == 200
        again = alice.post("/v1/batches", json={"template": BODY, "count": 20})
        assert again.status_code == 202, again.text
        held = redis_conn.zcard(
            f"darkroom:queued-of:alice:rq:queue:{settings.batch_queue_name}:{settings.served_model}"
        )
    print(f"\ncase 5: A {codes} then {again.status_code} after a cancel; B batches {theirs}; A holds {held}")
    assert held == 40


def test_case9_listing_is_cheap_and_reads_have_their_own_rate_limit(
    redis_url: str, redis_conn: redis_lib.Redis, tmp_path: Path
) -> None:
    settings = _settings(redis_url, tmp_path, read_rate_limit_per_minute=600, read_rate_limit_burst=30)
    with serve(create_app(settings), lifespan="on") as url:
        with _client(url, ALICE) as alice:
            batches = [
                alice.post("/v1/batches", json={"template": BODY, "count": 500}).json()["id"]
                for _ in range(4)
            ]
            alice.post(f"/v1/batches/{batches[0]}/cancel")
            listed = alice.get("/v1/batches", params={"limit": 100}).json()["data"]
            assert [b["counts"]["canceled"] for b in listed] == [0, 0, 0, 500]
            assert [b["counts"]["queued"] for b in listed] == [500, 500, 500, 0]
            assert [b["status"] for b in listed] == ["queued", "queued", "queued", "canceled"]
        with _client(url, BOB) as bob:
            job_id = bob.post("/v1/generations", json=BODY).json()["id"]
        attacker, stop, workers = _attack(url, ALICE, lambda c: c.get("/v1/batches?limit=100"), 20)
        latencies, statuses = _b_meanwhile(url, job_id, 28)
        stop.set()
        for worker in workers:
            worker.join()
    _report("case 9", latencies, statuses, attacker)
    assert all(status < 500 for status in statuses) and set(statuses) <= {200, 202}
    assert attacker.count(429) > 0 and set(attacker) <= {200, 429}
    assert statistics.median(latencies) < 1000
