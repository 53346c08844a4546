"""Storage errors: one base class, and a machine code on each so callers can report without parsing text.

The worker turns `StorageUnavailable` into the job error `storage_unavailable` (retrying later makes sense),
while any other `StorageError` is a configuration or programming problem that retrying will not fix.
"""


class StorageError(Exception):
    """Anything the storage layer refuses or fails at; `code` is stable, the message is for humans."""

    code = "storage_error"


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
