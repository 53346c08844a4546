"""S3 backend (AWS, MinIO, moto): private objects, explicit timeouts and retries, presigned GET URLs.

Credentials come from boto3's usual chain (AWS_* variables, shared config, instance roles); nothing here
reads secrets itself. Each instance owns its own botocore session because boto3's default session is not
thread-safe, while a client is, so one `S3Storage` can be shared by all API threads.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

# types-boto3 (a dev extra) may or may not be installed: without it these imports are untyped.
import boto3  # type: ignore[import-untyped, unused-ignore]
from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]
from botocore.exceptions import (  # type: ignore[import-untyped, unused-ignore]
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import (  # type: ignore[import-untyped, unused-ignore]
    ConnectionError as BotoConnectionError,
)

from services.storage.base import check_content_type, url_lifetime_seconds
from services.storage.errors import ObjectNotFound, StorageError, StorageUnavailable
from services.storage.keys import normalize_prefix, validate_key

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"})


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. `endpoint_url` is for S3-compatible servers; `public_endpoint_url` is the address
    clients use when it differs from ours (e.g. `http://minio:9000` inside compose, `http://localhost:9000`
    outside): presigned URLs are signed for the host they name, so they must be signed for the public one.
    Each botocore attempt is bounded by the timeouts, and a call by about `max_attempts` of them."""

    endpoint_url: str | None = None
    public_endpoint_url: str | None = None
    region_name: str | None = None
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 10.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("S3 connect and read timeouts must be positive")


def make_s3_client(options: S3Options, endpoint_url: str | None) -> Any:
    """A boto3 S3 client with explicit timeouts and standard retries, path-style for custom endpoints
    (MinIO and moto do not resolve `bucket.host` names). Typed `Any`: boto3 ships no annotations."""
    config = Config(
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        retries={"mode": "standard", "total_max_attempts": options.max_attempts},
        signature_version="s3v4",
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, region_name=options.region_name, config=config)


class S3Storage:
    """`Storage` on one bucket, every key under `prefix`. Objects are private: no ACL is ever sent, so they
    get the bucket's default (private, or bucket-owner-enforced); clients read them via presigned URLs."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.options = options or S3Options()
        self._client = make_s3_client(self.options, self.options.endpoint_url)
        public = self.options.public_endpoint_url
        self._signer = make_s3_client(self.options, public) if public else self._client

    def __repr__(self) -> str:
        return f"S3Storage('s3://{self.bucket}/{self.prefix}', endpoint={self.options.endpoint_url!r})"

    def object_key(self, key: str) -> str:
        """The full S3 key for a storage key: validated, then prefixed."""
        return self.prefix + validate_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload in one request (images are small); raises `StorageUnavailable` once botocore's retries
        are spent, so callers can retry later or report `storage_unavailable`."""
        object_key = self.object_key(key)
        check_content_type(content_type)
        with _translated_errors("put", object_key):
            self._client.put_object(Bucket=self.bucket, Key=object_key, Body=data, ContentType=content_type)

    def read(self, key: str) -> bytes:
        """Download the whole object; streaming errors count as unavailability too."""
        object_key = self.object_key(key)
        with _translated_errors("get", object_key):
            response = self._client.get_object(Bucket=self.bucket, Key=object_key)
            body: bytes = response["Body"].read()
        return body

    def url_for(self, key: str, expires_in: timedelta) -> str:
        """A fresh presigned GET URL. Signing is local (no request is made), so the API can afford it on
        every read. With temporary credentials the URL also dies when the session token does."""
        object_key = self.object_key(key)
        seconds = url_lifetime_seconds(expires_in)
        with _translated_errors("presign", object_key):
            url: str = self._signer.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": object_key}, ExpiresIn=seconds
            )
        return url

    def exists(self, key: str) -> bool:
        """HEAD the object: False on 404, errors for anything else (403 must not read as 'missing')."""
        object_key = self.object_key(key)
        try:
            with _translated_errors("head", object_key):
                self._client.head_object(Bucket=self.bucket, Key=object_key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        """S3 DELETE is already idempotent: a missing key succeeds."""
        object_key = self.object_key(key)
        with _translated_errors("delete", object_key):
            self._client.delete_object(Bucket=self.bucket, Key=object_key)

    def ping(self) -> None:
        """HEAD the bucket: proves the endpoint answers, the credentials work and the bucket exists."""
        try:
            with _translated_errors("head bucket", None):
                self._client.head_bucket(Bucket=self.bucket)
        except ObjectNotFound as exc:  # HEAD has no body, so a missing bucket is a bare 404
            raise StorageError(f"s3 bucket {self.bucket!r} does not exist") from exc

    def close(self) -> None:
        """Close the connection pools of both clients."""
        self._client.close()
        if self._signer is not self._client:
            self._signer.close()


@contextmanager
def _translated_errors(action: str, object_key: str | None) -> Iterator[None]:
    """Turn botocore's exceptions into our `StorageError` family, keeping the cause chained."""
    where = f"s3 {action} {object_key!r}" if object_key else f"s3 {action}"
    try:
        yield
    except ClientError as exc:
        raise _from_client_error(exc, where) from exc
    except (BotoConnectionError, HTTPClientError) as exc:
        raise StorageUnavailable(f"{where}: endpoint unreachable after retries: {exc}") from exc
    except NoCredentialsError as exc:
        raise StorageError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID etc.)") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{where}: {exc}") from exc


def _from_client_error(exc: Any, where: str) -> StorageError:
    """Classify an S3 error response: missing object, transient server trouble, or a real refusal."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    message = f"{where}: {code or status} {error.get('Message', '')}".rstrip()
    if code == "NoSuchBucket":
        return StorageError(message)
    if code in _NOT_FOUND_CODES:
        return ObjectNotFound(message)
    if status >= 500 or code in _TRANSIENT_CODES:
        return StorageUnavailable(message)
    return StorageError(message)
