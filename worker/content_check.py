"""Running the configured image classifier (``DARKROOM_IMAGE_CLASSIFIER``) over a job's images.

The classifier sees each image decoded from the very bytes that would be stored (so a JPEG is judged as
delivered), with the job's normalised request and the image's index. Anything but a :class:`Verdict` — an
exception, or another return value — fails the job with ``content_check_failed``: an image is never let
through because its check could not be made.
"""

from __future__ import annotations

import io
import logging

from PIL import Image

from schemas.generation import NORMALIZED_CONTEXT, GenerationRequest
from services.content_safety import ALLOWED, ImageClassifier, Verdict
from services.jobs import JobRecord
from worker.encoding import EncodedImage
from worker.errors import ContentCheckFailed

log = logging.getLogger(__name__)


def check_images(
    classifier: ImageClassifier | None, record: JobRecord, images: list[EncodedImage]
) -> list[Verdict]:
    """One verdict per image (all allowed without a classifier); raises :class:`ContentCheckFailed`."""
    if classifier is None:
        return [ALLOWED] * len(images)
    request = GenerationRequest.model_validate(record.request, context=NORMALIZED_CONTEXT)
    verdicts = []
    for index, encoded in enumerate(images):
        try:
            with Image.open(io.BytesIO(encoded.data)) as opened:
                image = opened.convert("RGB")
            verdict = classifier(image, request, index)
        except Exception as exc:
            log.error("image classifier failed on job %s image %d", record.id, index, exc_info=exc)
            raise ContentCheckFailed(
                f"the image classifier failed on image {index} ({type(exc).__name__}); see worker logs"
            ) from exc
        if not isinstance(verdict, Verdict):
            raise ContentCheckFailed(
                f"the image classifier returned {type(verdict).__name__} for image {index}, not a Verdict"
            )
        verdicts.append(verdict)
    return verdicts
