"""File backend: a local (or mounted) folder, for development and single-machine deployments.

Objects are plain files under `root`, written atomically so a reader never sees half an image. The API
serves them itself at `public_base_url + key`; with a `signing_key` those URLs carry an expiry and an
HMAC like S3's presigned URLs, so they can be handed to clients that hold no API key.
"""

import contextlib
import errno
import hashlib
import hmac
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

from services.storage.base import check_content_type, url_lifetime_seconds
from services.storage.errors import (
    InvalidKey,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    StorageWriteRefused,
)
from services.storage.keys import validate_key

FILE_MODE = 0o644

# The file backend keeps no metadata: the Content-Type is derived from the key's extension, and `put`
# refuses a declared type that disagrees, so what is served is always what the writer said.
CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "json": "application/json",
    "txt": "text/plain",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"

# OS errors that retrying will not fix: they mean a misconfigured root or a key clashing with a folder.
_PERMANENT_OS_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# OS errors that last until an operator frees space or remounts: failed at once, never retried.
_REFUSED_WRITES = {
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "quota_exceeded",
    errno.EROFS: "read_only",
    errno.EFBIG: "file_too_large",
}


class FileStorage:
    """`Storage` on a folder. Safe to share between threads: every write goes to its own temp file."""

    def __init__(
        self,
        root: Path,
        *,
        public_base_url: str | None = None,
        signing_key: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not root.is_absolute():
            raise ValueError(f"file storage root must be an absolute path, got {str(root)!r}")
        if signing_key is not None and len(signing_key) < 16:
            raise ValueError("file storage signing key must be at least 16 bytes")
        self.root = root
        self.public_base_url = _check_base_url(public_base_url) if public_base_url else None
        self._signing_key = signing_key
        self._clock = clock

    def __repr__(self) -> str:
        return f"FileStorage('file://{self.root}', public_base_url={self.public_base_url!r})"

    def with_public_base_url(self, public_base_url: str) -> "FileStorage":
        """The same folder and signing key, building URLs under another base (the API's, as a request
        reached it). Cheap: no I/O, nothing shared but immutable settings."""
        return FileStorage(
            self.root, public_base_url=public_base_url, signing_key=self._signing_key, clock=self._clock
        )

    @property
    def signs_urls(self) -> bool:
        """Whether `url_for` adds an expiry and signature the API must check with `verify_url`."""
        return self._signing_key is not None

    def path_for(self, key: str) -> Path:
        """The file that holds `key`, refusing any key that would land outside `root` — through `..`,
        an absolute key or NUL (see `validate_key`), or through a symlink inside the folder."""
        candidate = self.root / validate_key(key)
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise InvalidKey(f"storage key {key!r} resolves outside the storage root")
        return resolved

    def content_type_for(self, key: str) -> str:
        """The Content-Type the API should serve `key` with, from its extension."""
        _, dot, extension = key.rpartition("/")[2].rpartition(".")
        return CONTENT_TYPES.get(extension.lower(), DEFAULT_CONTENT_TYPE) if dot else DEFAULT_CONTENT_TYPE

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write to a temp file in the target folder, fsync, chmod 0644, then `os.replace` over the target:
        readers see the old object or the new one, never a partial file."""
        path = self.path_for(key)
        self._check_declared_type(key, content_type)
        with _translated_os_errors("put", key):
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, data)

    def read(self, key: str) -> bytes:
        """The object's bytes, or `ObjectNotFound`."""
        path = self.path_for(key)
        with _translated_os_errors("read", key):
            try:
                return path.read_bytes()
            except (FileNotFoundError, IsADirectoryError) as exc:
                raise ObjectNotFound(f"no object stored under {key!r}") from exc

    def file_for(self, key: str) -> tuple[Path, os.stat_result]:
        """The regular file holding `key` and its `os.stat_result`, for serving it in pieces (the API
        streams it, so no request holds a whole image in memory); `ObjectNotFound` if there is none."""
        path = self.path_for(key)
        with _translated_os_errors("stat", key):
            try:
                result = path.stat()
            except FileNotFoundError as exc:
                raise ObjectNotFound(f"no object stored under {key!r}") from exc
        if not stat.S_ISREG(result.st_mode):
            raise ObjectNotFound(f"no object stored under {key!r}")
        return path, result

    def url_for(self, key: str, expires_in: timedelta) -> str:
        """`public_base_url` + the quoted key, plus `expires` and `signature` when signing is on."""
        if self.public_base_url is None:
            raise StorageError("file storage has no public_base_url, so it cannot build URLs")
        url = self.public_base_url + quote(validate_key(key), safe="/")
        seconds = url_lifetime_seconds(expires_in)
        if self._signing_key is None:
            return url
        expires = int(self._clock()) + seconds
        return f"{url}?{urlencode({'expires': expires, 'signature': self._sign(key, expires)})}"

    def verify_url(self, key: str, expires: str | None, signature: str | None) -> bool:
        """Check the `expires`/`signature` query values of a URL from `url_for`: True only for an
        unexpired URL signed for exactly this key. Constant-time, so it leaks nothing by timing."""
        if self._signing_key is None:
            raise StorageError("file storage has no signing key: its URLs are not signed")
        # ASCII digits only, and short: int() refuses other digits and very long strings with errors.
        if not expires or not signature or len(expires) > 12 or not (expires.isascii() and expires.isdigit()):
            return False
        if int(expires) <= self._clock():
            return False
        # Compare bytes: compare_digest raises on non-ASCII str, and the signature is attacker-controlled.
        return hmac.compare_digest(signature.encode(), self._sign(key, int(expires)).encode())

    def exists(self, key: str) -> bool:
        """True for a regular file; folders are key prefixes, not objects."""
        return self.path_for(key).is_file()

    def delete(self, key: str) -> None:
        """Remove the file; empty parent folders are left (harmless, and racing writers may need them)."""
        path = self.path_for(key)
        with _translated_os_errors("delete", key):
            path.unlink(missing_ok=True)

    def ping(self) -> None:
        """Create `root` if needed and prove it writable with a throwaway file: a read-only mount would
        pass an existence check and fail the first job."""
        with _translated_os_errors("ping", None):
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".ping-"):
                pass

    def close(self) -> None:
        """Nothing to release."""

    def _sign(self, key: str, expires: int) -> str:
        assert self._signing_key is not None
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def _check_declared_type(self, key: str, content_type: str) -> None:
        check_content_type(content_type)
        declared = content_type.split(";", 1)[0].strip().lower()
        served = self.content_type_for(key)
        if declared != served:
            raise ValueError(
                f"file storage serves {key!r} as {served} (from its extension), "
                f"but it was put as {content_type!r}"
            )


def _check_base_url(url: str) -> str:
    """Require an absolute http(s) URL and end it with `/` so keys append cleanly."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"public_base_url must be an absolute http(s) URL without query, got {url!r}")
    return url if url.endswith("/") else url + "/"


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder (so `os.replace` is a rename, atomic on POSIX), removed on failure."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.chmod(temp_name, FILE_MODE)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


@contextlib.contextmanager
def _translated_os_errors(action: str, key: str | None) -> Iterator[None]:
    """OS errors become `StorageError` (configuration: permissions, a key clashing with a folder),
    `StorageWriteRefused` (a full disk or quota, a read-only mount: retrying cannot help) or
    `StorageUnavailable` (everything else: a vanished mount, an I/O error), so callers handle one family."""
    where = f"file {action} {key!r}" if key else f"file {action}"
    try:
        yield
    except _PERMANENT_OS_ERRORS as exc:
        raise StorageError(f"{where}: {exc}") from exc
    except OSError as exc:
        if exc.errno in _REFUSED_WRITES:
            raise StorageWriteRefused(f"{where}: {exc}", _REFUSED_WRITES[exc.errno]) from exc
        raise StorageUnavailable(f"{where}: {exc}") from exc
