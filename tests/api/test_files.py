"""``/v1/files/{key}`` as S3 serves an object (issue #16 case 14): ``HEAD``, one ``Range`` (206, or a 416
problem), the same signature checks and headers, and the file streamed: a 64 MiB download does not raise
the API's resident memory by anything near 64 MiB.

Real uvicorn in this process (``tests.api.serve``), so the RSS sampled is the server's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest

from api.main import create_app
from devtools.redis_server import RedisServer
from schemas.problems import PROBLEM_CONTENT_TYPE
from services.settings import Settings
from services.storage import FileStorage
from tests.api import serve

SIGNING_KEY = "files-test-signing-key-0123456789"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # 1032 bytes; only the extension decides the type
LARGE = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def served(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, FileStorage]]:
    root = tmp_path_factory.mktemp("files-outputs")
    settings = Settings(
        redis_url=redis_server.url,
        storage_url=f"file://{root}",
        url_signing_key=SIGNING_KEY,
        auth_disabled=True,
        rate_limit_per_minute=0,
    )
    with serve(create_app(settings), lifespan="on") as url:
        signer = FileStorage(root, public_base_url=f"{url}/v1/files/", signing_key=SIGNING_KEY.encode())
        signer.put("images/small.png", PNG, "image/png")
        with (root / "images" / "large.png").open("wb") as f:
            f.truncate(LARGE)  # sparse: 64 MiB to read, no disk used
        yield url, signer


def url_for(served: tuple[str, FileStorage], key: str) -> str:
    return served[1].url_for(key, timedelta(minutes=5))


def test_get_serves_the_whole_file_with_its_headers(served: tuple[str, FileStorage]) -> None:
    response = httpx.get(url_for(served, "images/small.png"))
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-length"] == str(len(PNG))
    assert response.headers["cache-control"] == "private, max-age=3600"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["accept-ranges"] == "bytes"


def test_head_gives_the_headers_and_no_body(served: tuple[str, FileStorage]) -> None:
    response = httpx.head(url_for(served, "images/small.png"))
    print(f"HEAD -> {response.status_code}, content-length {response.headers.get('content-length')}")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(len(PNG))
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["etag"]


@pytest.mark.parametrize(
    ("range_", "first", "last"),
    [("bytes=0-99", 0, 99), ("bytes=1000-", 1000, len(PNG) - 1), ("bytes=-32", len(PNG) - 32, len(PNG) - 1)],
)
def test_a_range_is_206_with_those_bytes(
    served: tuple[str, FileStorage], range_: str, first: int, last: int
) -> None:
    response = httpx.get(url_for(served, "images/small.png"), headers={"Range": range_})
    print(f"GET Range: {range_} -> {response.status_code}, {len(response.content)} bytes")
    assert response.status_code == 206
    assert response.content == PNG[first : last + 1]
    assert response.headers["content-range"] == f"bytes {first}-{last}/{len(PNG)}"
    assert response.headers["content-length"] == str(last - first + 1)


def test_a_range_past_the_end_is_a_416_problem(served: tuple[str, FileStorage]) -> None:
    response = httpx.get(url_for(served, "images/small.png"), headers={"Range": "bytes=5000-5100"})
    print(f"GET Range: bytes=5000-5100 -> {response.status_code}")
    assert response.status_code == 416
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert response.json()["code"] == "range_not_satisfiable"
    assert response.headers["content-range"] == f"bytes */{len(PNG)}"


@pytest.mark.parametrize("range_", ["bytes=0-1,5-6", "bytes=abc", "lines=1-2", "bytes=9-3"])
def test_ranges_s3_ignores_are_the_whole_file(served: tuple[str, FileStorage], range_: str) -> None:
    response = httpx.get(url_for(served, "images/small.png"), headers={"Range": range_})
    assert response.status_code == 200
    assert response.content == PNG


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_signature_is_checked_as_before(served: tuple[str, FileStorage], method: str) -> None:
    url = url_for(served, "images/small.png")
    assert httpx.request(method, url.replace("signature=", "signature=0")).status_code == 404
    assert httpx.request(method, url.split("?")[0]).status_code == 404
    assert httpx.request(method, url_for(served, "images/missing.png")).status_code == 404
    assert httpx.request(method, url_for(served, "images")).status_code == 404  # a folder


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_large_file_is_streamed_not_read_whole(served: tuple[str, FileStorage]) -> None:
    """The server's RSS, sampled while a 64 MiB file is downloaded (slowly, so the server is caught
    mid-way), grows by a small fraction of the file; reading it whole grew it by more than the file."""
    baseline = _rss_bytes()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    received = 0
    try:
        with httpx.stream("GET", url_for(served, "images/large.png"), timeout=60) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw(1024 * 1024):
                received += len(chunk)
    finally:
        done.set()
        sampler.join()
    grown = peak - baseline
    print(
        f"64 MiB download: server+client RSS {baseline / 2**20:.0f} MiB -> peak {peak / 2**20:.0f} MiB "
        f"(+{grown / 2**20:.1f} MiB)"
    )
    assert received == LARGE
    assert grown < LARGE // 4
