"""``/v1/files/{key}``: serving ``file://`` storage, since a local folder has no URL of its own.

URLs are signed and expiring exactly like S3 presigned URLs (``expires`` + ``signature`` query parameters,
minted by :class:`FileStorage`), so switching backends changes nothing for clients.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from api.contract import problem_responses
from api.deps import StateDep
from api.errors import NotFound
from services.storage import FileStorage, InvalidKey, ObjectNotFound

router = APIRouter(tags=["files"])


_IMAGE_BYTES = {"schema": {"type": "string", "format": "binary"}}


@router.get(
    "/v1/files/{key:path}",
    summary="Download a stored image (file:// storage only)",
    operation_id="downloadFile",
    response_class=Response,
    response_description="The image bytes.",
    responses={
        200: {"content": dict.fromkeys(("image/png", "image/jpeg", "image/webp"), _IMAGE_BYTES)},
        **problem_responses(
            404,
            500,
            503,
            described={404: "No such file, its URL expired, or this server stores images in S3."},
        ),
    },
)
async def download_file(
    key: str, state: StateDep, expires: str | None = None, signature: str | None = None
) -> Response:
    storage = state.clients.storage
    inner = getattr(storage, "inner", storage)  # unwrap RetryingStorage
    if not isinstance(inner, FileStorage):
        raise NotFound(detail="this server stores images in S3; use the URLs on the job")
    if inner.signs_urls and not inner.verify_url(key, expires, signature):
        raise NotFound(detail="no such file, or its URL expired: read the job again for a fresh URL")
    try:
        data = await run_in_threadpool(inner.read, key)
        content_type = inner.content_type_for(key)
    except (ObjectNotFound, InvalidKey):
        raise NotFound(detail="no such file") from None
    return Response(
        data,
        media_type=content_type,
        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )
