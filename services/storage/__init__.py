"""Object storage for generated images, shared by the worker (uploads) and the API (URLs, file serving).

storage = storage_from_url("s3://bucket/prefix", s3_endpoint_url=..., put_retry=RetryPolicy(...))
key = image_key(job_id, 0, "png", created_at)
storage.put(key, png_bytes, "image/png")        # worker; store `key` on the job
storage.url_for(key, timedelta(hours=1))        # API, on every read: URLs expire, keys do not
"""

from services.storage.base import MAX_URL_LIFETIME, Storage
from services.storage.errors import (
    InvalidKey,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    StorageWriteRefused,
)
from services.storage.factory import storage_from_url
from services.storage.keys import image_key, init_image_key, mask_image_key, validate_key
from services.storage.local import FileStorage
from services.storage.retry import RetryingStorage, RetryPolicy, call_with_backoff
from services.storage.s3 import S3Options, S3Storage

__all__ = [
    "MAX_URL_LIFETIME",
    "FileStorage",
    "InvalidKey",
    "ObjectNotFound",
    "RetryPolicy",
    "RetryingStorage",
    "S3Options",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "StorageWriteRefused",
    "call_with_backoff",
    "image_key",
    "init_image_key",
    "mask_image_key",
    "storage_from_url",
    "validate_key",
]
