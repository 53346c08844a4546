"""Build a `Storage` from one URL setting: `s3://bucket/prefix` or `file:///absolute/path`.

One URL keeps deployment configuration to a single variable; everything about reaching the backend
(endpoint, timeouts, URL signing) comes in as keyword arguments from settings.
"""

import re
from pathlib import Path, PurePosixPath
from urllib.parse import SplitResult, unquote, urlsplit

from services.storage.base import Storage
from services.storage.errors import InvalidKey
from services.storage.keys import normalize_prefix
from services.storage.local import FileStorage
from services.storage.retry import RetryingStorage, RetryPolicy
from services.storage.s3 import S3Options, S3Storage

# S3's bucket naming rules (3-63 chars, lowercase, digits, dots, hyphens; alphanumeric at both ends).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def storage_from_url(
    url: str,
    *,
    s3_endpoint_url: str | None = None,
    s3_public_endpoint_url: str | None = None,
    s3_region: str | None = None,
    s3_connect_timeout_s: float = 2.0,
    s3_read_timeout_s: float = 10.0,
    s3_max_attempts: int = 3,
    public_base_url: str | None = None,
    file_signing_key: bytes | None = None,
    put_retry: RetryPolicy | None = None,
) -> Storage:
    """Parse `url` and build the backend it names; `ValueError` naming the value if it names none.

    `s3_*` arguments apply to `s3://` URLs, `public_base_url` and `file_signing_key` to `file://` ones
    (see `FileStorage`). With `put_retry`, uploads are retried through outages (see `RetryingStorage`).
    No connection is made here: call `ping()` to check readiness.
    """
    parts = _split(url)
    storage: Storage
    if parts.scheme == "s3":
        bucket, prefix = _parse_s3(url, parts)
        options = S3Options(
            endpoint_url=s3_endpoint_url,
            public_endpoint_url=s3_public_endpoint_url,
            region_name=s3_region,
            connect_timeout_s=s3_connect_timeout_s,
            read_timeout_s=s3_read_timeout_s,
            max_attempts=s3_max_attempts,
        )
        storage = S3Storage(bucket, prefix, options)
    else:
        root = _parse_file(url, parts)
        storage = FileStorage(root, public_base_url=public_base_url, signing_key=file_signing_key)
    return RetryingStorage(storage, put_retry) if put_retry else storage


def _split(url: str) -> SplitResult:
    """Check what both schemes share: a known scheme, no credentials, no query or fragment."""
    parts = urlsplit(url)
    if parts.scheme not in ("s3", "file"):
        raise ValueError(f"storage URL {url!r} must start with s3:// or file://")
    if "@" in parts.netloc:
        # Do not echo the value: it probably holds a secret.
        raise ValueError("storage URL must not contain credentials; use AWS_* variables instead")
    if parts.query or parts.fragment:
        raise ValueError(f"storage URL {url!r} must not have a query or fragment")
    return parts


def _parse_s3(url: str, parts: SplitResult) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"storage URL {url!r} does not name a valid S3 bucket (got {bucket!r})")
    prefix = parts.path.strip("/")
    try:
        normalize_prefix(prefix)
    except InvalidKey as exc:
        raise ValueError(f"storage URL {url!r} has an invalid prefix: {exc}") from exc
    return bucket, prefix


def _parse_file(url: str, parts: SplitResult) -> Path:
    """`file:///srv/darkroom` -> Path("/srv/darkroom"); relative or un-normalized paths are refused."""
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"storage URL {url!r} must be file:///absolute/path (three slashes)")
    path = unquote(parts.path)
    if not path.startswith("/") or ".." in PurePosixPath(path).parts or "\x00" in path:
        raise ValueError(f"storage URL {url!r} must name an absolute path without '..'")
    return Path(path)
