"""Storage errors: one base class, and a machine code on each so callers can report without parsing text.

The worker turns `StorageUnavailable` into the job error `storage_unavailable` (retrying later makes sense),
while any other `StorageError` is a configuration or programming problem that retrying will not fix.
"""


class StorageError(Exception):
    """Anything the storage layer refuses or fails at; `code` is stable, the message is for humans."""

    code = "storage_error"


class StorageWriteRefused(StorageError):
    """The backend cannot take writes until an operator acts: a full disk, a quota, a read-only mount.

    Not an outage: retrying only holds the GPU until the deadline, so it fails the job at once (its
    code stays ``storage_error``). ``reason`` is the metric label (``no_space``, ``quota_exceeded``,
    ``read_only``, ``file_too_large``).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class StorageUnavailable(StorageError):
    """The backend could not be reached (or kept failing with 5xx) even after retries: try again later."""

    code = "storage_unavailable"


class ObjectNotFound(StorageError):
    """The key names no object. Separate so the API can answer 404 instead of 500."""

    code = "object_not_found"


class InvalidKey(StorageError, ValueError):
    """A key that could escape its root or confuse a backend (`..`, absolute, NUL, ...).

    Also a `ValueError`, because it is bad input rather than a failing backend.
    """

    code = "invalid_key"
