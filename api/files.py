"""``/v1/files/{key}``: serving ``file://`` storage, since a local folder has no URL of its own.

URLs are signed and expiring exactly like S3 presigned URLs (``expires`` + ``signature`` query parameters,
minted by :class:`FileStorage`), so switching backends changes nothing for clients. As S3 does, the file
answers ``HEAD`` and a single ``Range`` (206, or 416 past its end), and is streamed in 64 KiB pieces from a
worker thread: no request holds a whole file in memory, and none reads on the event loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response
from fastapi.concurrency import run_in_threadpool
from starlette.responses import FileResponse
from starlette.types import Receive, Scope, Send

from api.contract import problem_responses
from api.deps import StateDep
from api.errors import ApiError, NotFound
from api.state import AppState
from services.jobs.archive import RECORDS_PREFIX
from services.storage import FileStorage, InvalidKey, ObjectNotFound

router = APIRouter(tags=["files"])

_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
_IMAGE_BYTES = {"schema": {"type": "string", "format": "binary"}}
_HEADERS = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
_FILE_HEADERS: dict[str, Any] = {
    "Content-Length": {"description": "Bytes in this response's body.", "schema": {"type": "integer"}},
    "Accept-Ranges": {"description": "Always `bytes`: one `Range` is served.", "schema": {"type": "string"}},
    "ETag": {"description": "Changes when the file does (for `If-Range`).", "schema": {"type": "string"}},
}
_RANGE_DOC = (
    "One byte range (`bytes=0-99`, `bytes=100-`, `bytes=-100`): answered 206 with `Content-Range`. As S3 "
    "does, a list of ranges or a malformed value is ignored (the whole file, 200); a range that starts "
    "past the end is 416."
)


class RangeNotSatisfiable(ApiError):
    """416: the ``Range`` starts past the file's end; ``Content-Range: bytes */<size>`` says its size."""

    status = 416
    code = "range_not_satisfiable"
    title = "Range Not Satisfiable"


class _StoredFile(FileResponse):
    """Starlette's ``FileResponse`` (HEAD, single and multiple ranges, ``If-Range``, chunked reads in a
    thread), told to ignore a ``Range`` the route decided not to honour, so it never answers its own
    plain-text 400/416."""

    def __init__(
        self, path: Path, stat_result: os.stat_result, media_type: str, *, honour_range: bool
    ) -> None:
        super().__init__(path, headers=_HEADERS, media_type=media_type, stat_result=stat_result)
        self._honour_range = honour_range

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._honour_range:
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
        await super().__call__(scope, receive, send)


def _single_range(header: str | None, size: int) -> bool:
    """Whether to honour ``header``: one well-formed byte range. 416 for one that starts past the end."""
    if header is None:
        return False
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return False
    start, dash, end = (part.strip() for part in spec.partition("-"))
    if not dash or not (start or end) or not all(p.isascii() and p.isdigit() for p in (start, end) if p):
        return False
    if start and end and int(end) < int(start):
        return False
    if (start and int(start) >= size) or (not start and (int(end) == 0 or size == 0)):
        raise RangeNotSatisfiable(
            f"the file has {size} bytes; the range {spec.strip()!r} selects none of them",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return True


RangeHeader = Annotated[str | None, Header(description=_RANGE_DOC)]
_PROBLEMS = problem_responses(
    404,
    416,
    500,
    503,
    described={
        404: "No such file, its URL expired, or this server stores images in S3.",
        416: "The range starts past the file's end (`range_not_satisfiable`).",
    },
)
_RANGE_HEADERS = {
    **_FILE_HEADERS,
    "Content-Range": {"description": "`bytes <first>-<last>/<size>`.", "schema": {"type": "string"}},
}


@router.get(
    "/v1/files/{key:path}",
    summary="Download a stored image (file:// storage only)",
    operation_id="downloadFile",
    response_class=Response,
    response_description="The image bytes.",
    responses={
        200: {"content": dict.fromkeys(_IMAGE_TYPES, _IMAGE_BYTES), "headers": _FILE_HEADERS},
        206: {
            "description": "The requested byte range of the image.",
            "content": dict.fromkeys(_IMAGE_TYPES, _IMAGE_BYTES),
            "headers": _RANGE_HEADERS,
        },
        **_PROBLEMS,
    },
)
async def download_file(
    key: str,
    state: StateDep,
    expires: str | None = None,
    signature: str | None = None,
    range: RangeHeader = None,  # noqa: A002  # the header's name
) -> Response:
    return await _serve(state, key, expires, signature, range)


@router.head(
    "/v1/files/{key:path}",
    summary="A stored image's headers, without its bytes (file:// storage only)",
    operation_id="headFile",
    response_class=Response,
    response_description="The headers a GET would answer (type, length, ETag), and no body.",
    responses={
        200: {"headers": _FILE_HEADERS},
        206: {"description": "The headers of the requested byte range.", "headers": _RANGE_HEADERS},
        **_PROBLEMS,
    },
)
async def head_file(
    key: str,
    state: StateDep,
    expires: str | None = None,
    signature: str | None = None,
    range: RangeHeader = None,  # noqa: A002
) -> Response:
    return await _serve(state, key, expires, signature, range)


async def _serve(
    state: AppState, key: str, expires: str | None, signature: str | None, range_: str | None
) -> Response:
    storage = state.clients.storage
    inner = getattr(storage, "inner", storage)  # unwrap RetryingStorage
    if not isinstance(inner, FileStorage):
        raise NotFound(detail="this server stores images in S3; use the URLs on the job")
    if key.startswith(RECORDS_PREFIX):  # archived job records: read through the API, never as files
        raise NotFound(detail="no such file")
    if inner.signs_urls and not inner.verify_url(key, expires, signature):
        raise NotFound(detail="no such file, or its URL expired: read the job again for a fresh URL")
    try:
        path, stat_result = await run_in_threadpool(inner.file_for, key)
        content_type = inner.content_type_for(key)
    except (ObjectNotFound, InvalidKey):
        raise NotFound(detail="no such file") from None
    honour = _single_range(range_, stat_result.st_size)
    return _StoredFile(path, stat_result, content_type, honour_range=honour)
