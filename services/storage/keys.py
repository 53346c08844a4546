"""Object keys: validation shared by every backend, prefixing, and the layout of generated images.

Keys are validated in one place so that a key that is safe for S3 is also safe as a relative file path:
the file backend maps keys straight onto the filesystem, and the API serves keys that come from URLs.
"""

import re
from datetime import UTC, datetime

from services.storage.errors import InvalidKey

MAX_KEY_BYTES = 1024  # S3's own limit on key length, in UTF-8 bytes.

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_EXTENSION = re.compile(r"[a-z0-9]{1,8}")
_FORBIDDEN_SEGMENTS = frozenset({"", ".", ".."})


def validate_key(key: str) -> str:
    """Return `key` unchanged if it is a safe relative key, else raise `InvalidKey` naming it.

    Refused: empty keys, absolute keys, NUL and other control characters, backslashes (a separator on
    Windows and a classic traversal trick), and empty, `.` or `..` segments — so `a/../b` and `a//b` never
    reach a filesystem or an S3 key that differs from what the caller meant.
    """
    if not key:
        raise InvalidKey("storage key must not be empty")
    if any(ord(char) < 0x20 or char == "\x7f" for char in key):
        raise InvalidKey(f"storage key {key!r} contains a control character")
    if "\\" in key:
        raise InvalidKey(f"storage key {key!r} contains a backslash")
    if key.startswith("/"):
        raise InvalidKey(f"storage key {key!r} must be relative, not absolute")
    if any(segment in _FORBIDDEN_SEGMENTS for segment in key.split("/")):
        raise InvalidKey(f"storage key {key!r} has an empty, '.' or '..' segment")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(f"storage key is longer than {MAX_KEY_BYTES} bytes: {key[:64]!r}...")
    return key


def normalize_prefix(prefix: str) -> str:
    """Turn `a/b`, `a/b/` or `` into `a/b/` or ``: the prefix is joined to keys by plain concatenation."""
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    validate_key(stripped)
    return stripped + "/"


def init_image_key(job_id: str, extension: str, created_at: datetime) -> str:
    """Key of a job's uploaded init image, beside its outputs: `generations/YYYY/MM/DD/<job_id>/init.<ext>`.

    Init images go to storage rather than into Redis: they can be megabytes, and a queue of them would
    fill Redis's memory.
    """
    return image_key(job_id, 0, extension, created_at).rsplit("/", 1)[0] + f"/init.{extension}"


def mask_image_key(job_id: str, extension: str, created_at: datetime) -> str:
    """Key of a job's uploaded inpainting mask, beside its init image: `.../<job_id>/mask.<ext>`."""
    return image_key(job_id, 0, extension, created_at).rsplit("/", 1)[0] + f"/mask.{extension}"


def image_key(job_id: str, index: int, extension: str, created_at: datetime) -> str:
    """Key of one generated image: `generations/YYYY/MM/DD/<job_id>/<index>.<ext>`.

    Partitioned by the job's UTC creation date so lifecycle rules and listings can work per day, and
    grouped per job so all of a job's outputs can be found or deleted together. The job id becomes a
    path segment, so it is held to a conservative charset instead of being escaped.
    """
    if not _JOB_ID.fullmatch(job_id):
        raise InvalidKey(
            f"job id {job_id!r} must be 1-128 characters of [A-Za-z0-9_-], not starting with - or _"
        )
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidKey(f"image index must be a non-negative integer, got {index!r}")
    if not _EXTENSION.fullmatch(extension):
        raise InvalidKey(
            f"image extension {extension!r} must be 1-8 lowercase letters or digits, without a dot"
        )
    if created_at.tzinfo is None or created_at.utcoffset() is None:
        raise ValueError(f"created_at must be timezone-aware, got naive {created_at.isoformat()}")
    day = created_at.astimezone(UTC)
    return f"generations/{day:%Y/%m/%d}/{job_id}/{index}.{extension}"
