"""Both storage backends over real HTTP: S3 against a moto server, files through a tiny file server.

What matters to callers is end to end: a key `put` by the worker comes back byte for byte, with its
content type, from the URL the API hands out, and from nowhere else.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import httpx
import pytest

from devtools.net import free_port
from services.storage import (
    FileStorage,
    InvalidKey,
    ObjectNotFound,
    RetryingStorage,
    RetryPolicy,
    S3Options,
    S3Storage,
    Storage,
    StorageError,
    StorageUnavailable,
    storage_from_url,
)
from tests.fixtures.s3 import MotoServer, S3Bucket, start_moto_server

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
KEY = "generations/2026/11/22/job-1/0.png"
HOUR = timedelta(hours=1)
SIGNING_KEY = b"test-signing-key-0123456789abcdef"


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """An HTTP client that ignores proxy variables: every request here goes to 127.0.0.1."""
    with httpx.Client(trust_env=False, timeout=5) as client:
        yield client


@pytest.fixture
def s3_storage(s3_bucket_url: S3Bucket) -> Iterator[Storage]:
    storage = storage_from_url(s3_bucket_url.storage_url, s3_endpoint_url=s3_bucket_url.endpoint_url)
    yield storage
    storage.close()


# --- S3 -------------------------------------------------------------------------------------------


def test_s3_round_trip_through_a_presigned_url(
    s3_storage: Storage, s3_bucket_url: S3Bucket, http: httpx.Client
) -> None:
    s3_storage.put(KEY, PNG, "image/png")

    response = http.get(s3_storage.url_for(KEY, HOUR))

    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"
    assert s3_storage.read(KEY) == PNG
    # The prefix from the storage URL is applied behind the caller's back.
    head = s3_bucket_url.client().head_object(Bucket=s3_bucket_url.bucket, Key=f"outputs/{KEY}")
    assert head["ContentType"] == "image/png"


def test_s3_presigned_url_lasts_what_was_asked(s3_storage: Storage) -> None:
    query = parse_qs(urlsplit(s3_storage.url_for(KEY, timedelta(minutes=15))).query)
    assert query["X-Amz-Expires"] == ["900"]
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]


@pytest.mark.parametrize("lifetime", [timedelta(0), timedelta(seconds=-5), timedelta(days=7, seconds=1)])
def test_s3_refuses_url_lifetimes_s3_cannot_honour(s3_storage: Storage, lifetime: timedelta) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        s3_storage.url_for(KEY, lifetime)


def test_s3_objects_are_private(s3_storage: Storage, s3_bucket_url: S3Bucket, http: httpx.Client) -> None:
    s3_storage.put(KEY, PNG, "image/png")

    anonymous = http.get(s3_bucket_url.object_url(KEY))

    assert anonymous.status_code == 403
    acl = s3_bucket_url.client().get_object_acl(Bucket=s3_bucket_url.bucket, Key=f"outputs/{KEY}")
    grantees = {grant["Grantee"].get("URI") for grant in acl["Grants"]}
    assert not any(uri and ("AllUsers" in uri or "AuthenticatedUsers" in uri) for uri in grantees)


def test_s3_forged_presigned_url_is_refused(s3_storage: Storage, http: httpx.Client) -> None:
    s3_storage.put(KEY, PNG, "image/png")
    parts = urlsplit(s3_storage.url_for(KEY, HOUR))
    query = parts.query.replace("X-Amz-Signature=", "X-Amz-Signature=0000", 1)
    forged = urlunsplit(parts._replace(query=query))

    response = http.get(forged)

    if response.status_code == 200:
        # Real S3 and MinIO answer 403 here (and for expired URLs); moto checks neither, so against
        # moto this can only show that our URLs are well-formed, not that S3 enforces them.
        pytest.skip("moto does not verify presigned URL signatures or expiry")
    assert response.status_code == 403


def test_s3_exists_read_delete(s3_storage: Storage) -> None:
    assert not s3_storage.exists(KEY)
    with pytest.raises(ObjectNotFound):
        s3_storage.read(KEY)

    s3_storage.put(KEY, PNG, "image/png")
    assert s3_storage.exists(KEY)

    s3_storage.delete(KEY)
    s3_storage.delete(KEY)  # idempotent
    assert not s3_storage.exists(KEY)


def test_s3_ping(s3_storage: Storage, s3_bucket_url: S3Bucket) -> None:
    s3_storage.ping()
    missing = storage_from_url("s3://no-such-bucket-here/x", s3_endpoint_url=s3_bucket_url.endpoint_url)
    with pytest.raises(StorageError, match="does not exist") as raised:
        missing.ping()
    assert not isinstance(raised.value, StorageUnavailable)  # retrying will not create the bucket


@pytest.mark.parametrize("key", ["../escape.png", "/abs.png", "a/../../b.png", "a\x00.png"])
def test_s3_refuses_unsafe_keys(s3_storage: Storage, key: str) -> None:
    with pytest.raises(InvalidKey):
        s3_storage.put(key, PNG, "image/png")
    with pytest.raises(InvalidKey):
        s3_storage.url_for(key, HOUR)


def test_s3_refuses_header_injection_through_content_type(s3_storage: Storage) -> None:
    with pytest.raises(ValueError, match="content type"):
        s3_storage.put(KEY, PNG, "image/png\r\nX-Evil: 1")


def test_s3_unreachable_endpoint_raises_storage_unavailable_promptly(aws_credentials: object) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused at once
    storage = storage_from_url(
        "s3://bucket/x",
        s3_endpoint_url=closed,
        s3_connect_timeout_s=0.5,
        s3_read_timeout_s=0.5,
        s3_max_attempts=2,
    )
    started = time.monotonic()

    with pytest.raises(StorageUnavailable, match="unreachable"):
        storage.put(KEY, PNG, "image/png")
    with pytest.raises(StorageUnavailable):
        storage.ping()

    assert time.monotonic() - started < 5  # botocore's 2 attempts, each refused immediately


def test_s3_retry_survives_an_endpoint_that_comes_up_during_backoff(
    s3_bucket_url: S3Bucket, aws_credentials: object
) -> None:
    port = free_port()
    options = S3Options(
        endpoint_url=f"http://127.0.0.1:{port}", connect_timeout_s=0.5, read_timeout_s=2, max_attempts=1
    )
    late_servers: list[MotoServer] = []

    def sleep_then_start_server(seconds: float) -> None:
        # The outage ends while the worker backs off: deterministic, no wall-clock race.
        if not late_servers:
            late_servers.append(start_moto_server(port))

    storage = RetryingStorage(
        S3Storage(s3_bucket_url.bucket, "late", options),
        RetryPolicy(deadline_s=10, base_delay_s=0.01, max_delay_s=0.05),
        sleep=sleep_then_start_server,
    )
    try:
        storage.put(KEY, PNG, "image/png")  # the first attempt is refused, the retry lands
    finally:
        for server in late_servers:
            server.stop()

    assert len(late_servers) == 1
    # moto shares its data per process, so the session server sees what the late one stored.
    stored = s3_bucket_url.client().get_object(Bucket=s3_bucket_url.bucket, Key=f"late/{KEY}")
    assert stored["Body"].read() == PNG


def test_s3_retry_gives_up_after_its_deadline(aws_credentials: object) -> None:
    options = S3Options(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=0.5, max_attempts=1)
    storage = RetryingStorage(
        S3Storage("bucket", "", options), RetryPolicy(deadline_s=0.3, base_delay_s=0.05)
    )
    started = time.monotonic()

    with pytest.raises(StorageUnavailable):
        storage.put(KEY, PNG, "image/png")

    assert 0.3 <= time.monotonic() - started < 3


@contextmanager
def s3_error_server(status: int, code: str) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server answering every request with one S3 error; yields its URL and request log."""
    requests: list[str] = []
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>m</Message></Error>"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            requests.append(self.command)
            payload = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving(Handler) as url:
        yield url, requests


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_s3_server_errors_count_as_unavailable_after_botocore_retries(aws_credentials: object) -> None:
    with s3_error_server(503, "SlowDown") as (url, requests):
        storage = storage_from_url("s3://bucket/x", s3_endpoint_url=url, s3_max_attempts=2)
        with pytest.raises(StorageUnavailable, match="SlowDown"):
            storage.put(KEY, PNG, "image/png")
    assert requests == ["PUT", "PUT"]


def test_s3_access_denied_is_not_unavailable_and_not_retried(aws_credentials: object) -> None:
    with s3_error_server(403, "AccessDenied") as (url, requests):
        storage = storage_from_url("s3://bucket/x", s3_endpoint_url=url, s3_max_attempts=3)
        with pytest.raises(StorageError, match="AccessDenied") as raised:
            storage.put(KEY, PNG, "image/png")
    assert not isinstance(raised.value, StorageUnavailable)
    assert requests == ["PUT"]


# --- files ----------------------------------------------------------------------------------------


class Clock:
    """Wall clock stand-in for URL expiry, moved by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@contextmanager
def file_server(storage_for: Callable[[str], FileStorage]) -> Iterator[str]:
    """Serve `/v1/files/<key>` the way the API will: check the signature, then stream the file."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            key = unquote(parts.path.removeprefix("/v1/files/"))
            query = {name: values[0] for name, values in parse_qs(parts.query).items()}
            storage = storage_for(key)
            if storage.signs_urls and not storage.verify_url(
                key, query.get("expires"), query.get("signature")
            ):
                self.send_error(403)
                return
            try:
                data = storage.read(key)
            except InvalidKey:
                self.send_error(400)
                return
            except ObjectNotFound:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", storage.content_type_for(key))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving(Handler) as url:
        yield url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def signed_files(tmp_path: Path, clock: Clock) -> Iterator[FileStorage]:
    """A signing `FileStorage` whose URLs point at a live file server."""
    holder: list[FileStorage] = []
    with file_server(lambda key: holder[0]) as url:
        holder.append(
            FileStorage(
                tmp_path / "objects", public_base_url=f"{url}/v1/files", signing_key=SIGNING_KEY, clock=clock
            )
        )
        yield holder[0]


def test_file_round_trip_through_a_signed_url(signed_files: FileStorage, http: httpx.Client) -> None:
    signed_files.put(KEY, PNG, "image/png")

    response = http.get(signed_files.url_for(KEY, HOUR))

    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"


def test_file_url_expires(signed_files: FileStorage, clock: Clock, http: httpx.Client) -> None:
    signed_files.put(KEY, PNG, "image/png")
    url = signed_files.url_for(KEY, timedelta(minutes=5))

    clock.now += 5 * 60

    assert http.get(url).status_code == 403


def test_file_url_with_forged_signature_or_other_key_is_refused(
    signed_files: FileStorage, http: httpx.Client
) -> None:
    other = KEY.replace("0.png", "1.png")
    signed_files.put(KEY, PNG, "image/png")
    signed_files.put(other, b"other", "image/png")
    url = signed_files.url_for(KEY, HOUR)

    forged = url.replace("signature=", "signature=0", 1)
    swapped = url.replace("/0.png?", "/1.png?", 1)

    assert http.get(forged).status_code == 403
    assert http.get(swapped).status_code == 403


@pytest.mark.parametrize(
    ("expires", "signature"),
    [
        (None, None),
        ("", "x"),
        ("not-a-number", "x"),
        ("\u00b2", "x"),
        ("9" * 5000, "x"),
        ("9999999999", "\u00e9"),
    ],
)
def test_file_verify_url_refuses_malformed_values_without_raising(
    signed_files: FileStorage, expires: str | None, signature: str | None
) -> None:
    assert signed_files.verify_url(KEY, expires, signature) is False


def test_file_url_without_signing_is_a_plain_path(tmp_path: Path) -> None:
    storage = storage_from_url(f"file://{tmp_path}", public_base_url="http://127.0.0.1:8000/v1/files/")
    assert storage.url_for("a b/0.png", HOUR) == "http://127.0.0.1:8000/v1/files/a%20b/0.png"


def test_file_url_needs_a_public_base_url(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="public_base_url"):
        FileStorage(tmp_path).url_for(KEY, HOUR)


def test_file_put_is_atomic_private_to_write_and_leaves_no_temp_files(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "root")
    storage.put(KEY, b"first", "image/png")
    storage.put(KEY, PNG, "image/png")  # replaces

    path = storage.path_for(KEY)
    assert path.read_bytes() == PNG
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(path.parent) == ["0.png"]
    assert storage.read(KEY) == PNG and storage.exists(KEY)


def test_file_failed_write_cleans_up_its_temp_file(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.put("taken/0.png", PNG, "image/png")

    with pytest.raises(StorageError):
        storage.put("taken", b"x", "application/octet-stream")  # a folder is in the way

    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert os.listdir(tmp_path / "taken") == ["0.png"]


def test_file_exists_read_delete(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    assert not storage.exists(KEY)
    with pytest.raises(ObjectNotFound):
        storage.read(KEY)
    storage.put(KEY, PNG, "image/png")
    storage.delete(KEY)
    storage.delete(KEY)
    assert not storage.exists(KEY)
    with pytest.raises(ObjectNotFound):
        storage.read("generations")  # a folder is a prefix, not an object


@pytest.mark.parametrize("key", ["../escape.png", "/etc/passwd", "a/../../escape.png", "a\x00.png", "..\\x"])
def test_file_path_traversal_is_refused(tmp_path: Path, key: str) -> None:
    storage = FileStorage(tmp_path / "root")
    for operation in (
        lambda: storage.path_for(key),
        lambda: storage.put(key, b"x", "image/png"),
        lambda: storage.read(key),
        lambda: storage.delete(key),
    ):
        with pytest.raises(InvalidKey):
            operation()
    assert not (tmp_path / "escape.png").exists()


def test_file_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)

    with pytest.raises(InvalidKey, match="outside the storage root"):
        FileStorage(root).put("link/0.png", PNG, "image/png")
    assert list(outside.iterdir()) == []


def test_file_served_content_type_must_match_the_declared_one(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    with pytest.raises(ValueError, match="serves"):
        storage.put("0.png", PNG, "image/jpeg")
    storage.put("0.jpg", b"jpeg", "image/jpeg; charset=binary")
    assert storage.content_type_for("0.jpg") == "image/jpeg"
    assert storage.content_type_for("no-extension") == "application/octet-stream"


def test_file_ping_creates_the_root(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "new" / "root")
    storage.ping()
    assert (tmp_path / "new" / "root").is_dir()
    assert list((tmp_path / "new" / "root").iterdir()) == []


def test_file_storage_needs_an_absolute_root_and_a_real_signing_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        FileStorage(Path("relative"))
    with pytest.raises(ValueError, match="16 bytes"):
        FileStorage(tmp_path, signing_key=b"short")


# --- storage URLs ---------------------------------------------------------------------------------


def test_storage_from_url_s3(aws_credentials: object) -> None:
    storage = storage_from_url("s3://my-bucket/a/b/", s3_endpoint_url="http://127.0.0.1:9")
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == ("my-bucket", "a/b/")
    assert storage.object_key("k.png") == "a/b/k.png"
    bare = storage_from_url("s3://my-bucket")
    assert isinstance(bare, S3Storage) and bare.prefix == ""


def test_storage_from_url_file(tmp_path: Path) -> None:
    storage = storage_from_url(f"file://{tmp_path}/out%20put")
    assert isinstance(storage, FileStorage)
    assert storage.root == tmp_path / "out put"
    assert isinstance(storage_from_url("file://localhost/srv/x"), FileStorage)


def test_storage_from_url_wraps_retries_when_asked(tmp_path: Path) -> None:
    storage = storage_from_url(f"file://{tmp_path}", put_retry=RetryPolicy(deadline_s=30))
    assert isinstance(storage, RetryingStorage)
    assert storage.policy.deadline_s == 30


@pytest.mark.parametrize(
    "url",
    [
        "",
        "my-bucket/prefix",
        "http://127.0.0.1/bucket",
        "S3://",
        "s3://",
        "s3://Upper-Case",
        "s3://ab",
        "s3://bucket_underscore",
        "s3://bucket../x",
        "s3://bucket/../x",
        "s3://bucket/a//b",
        "s3://bucket/p?versionId=1",
        "file://relative/path",
        "file:relative",
        "file:///srv/../etc",
        "file:///srv/x#frag",
    ],
)
def test_storage_from_url_names_the_bad_value(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        storage_from_url(url)
    assert repr(url) in str(raised.value)


def test_storage_from_url_never_echoes_credentials() -> None:
    with pytest.raises(ValueError, match="credentials") as raised:
        storage_from_url("s3://AKIAEXAMPLE:s3cr3t@bucket/x")
    assert "s3cr3t" not in str(raised.value)
