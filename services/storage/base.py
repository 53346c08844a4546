"""The `Storage` protocol both processes program against, and the argument checks every backend shares.

The worker only `put`s; the API only reads (`url_for` on every job read, `read` for the file backend).
Keys are what jobs store; URLs are derived on demand because they expire.
"""

import re
from datetime import timedelta
from typing import Protocol

MAX_URL_LIFETIME = timedelta(days=7)  # SigV4 presigned URLs cannot live longer; same cap for file URLs.

# type "/" subtype, then optional parameters; no CR/LF so a content type can never inject a header.
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*(?:\s*;[ -~]*)?")


class Storage(Protocol):
    """Where generated images live. Implementations must be safe to share between threads."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key` privately, replacing any previous object; idempotent, so retryable."""
        ...

    def read(self, key: str) -> bytes:
        """Return the object's bytes; raise `ObjectNotFound` if there is none."""
        ...

    def url_for(self, key: str, expires_in: timedelta) -> str:
        """A URL a client can GET without our API key, valid for about `expires_in`. Never store it."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (retention jobs can rerun)."""
        ...

    def ping(self) -> None:
        """Readiness probe: return if the backend is usable, raise a `StorageError` saying why not."""
        ...

    def close(self) -> None:
        """Release connections; the API lifespan and worker shutdown call it."""
        ...


def check_content_type(content_type: str) -> str:
    """Refuse content types that are not `type/subtype[; params]`: they end up as a response header."""
    if not _CONTENT_TYPE.fullmatch(content_type):
        raise ValueError(f"content type {content_type!r} is not of the form type/subtype[; parameters]")
    return content_type


def url_lifetime_seconds(expires_in: timedelta) -> int:
    """Whole seconds in `expires_in`, between 1 s and 7 days, or `ValueError`: a zero or negative lifetime
    would mint URLs that are dead on arrival, and S3 rejects presigned URLs over 7 days."""
    seconds = int(expires_in.total_seconds())
    if not 1 <= seconds <= int(MAX_URL_LIFETIME.total_seconds()):
        raise ValueError(f"URL lifetime must be between 1 second and 7 days, got {expires_in}")
    return seconds
