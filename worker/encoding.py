"""Encoding generated images, with the parameters that made them embedded in the file.

People drag our PNGs into A1111/ComfyUI-style tools and expect the prompt and seed to come along, so PNGs
carry a ``parameters`` text chunk in the A1111 form plus a ``darkroom`` JSON chunk with the full normalised
request; JPEG and WebP carry the A1111 text as EXIF UserComment. Nothing time-dependent is embedded, so the
same pixels always encode to the same bytes (and the same sha256).

Metadata never stops an image from being produced:
- Line breaks in prompts become spaces in the A1111 text (one prompt line, one negative line, one settings
  line), so a prompt cannot forge a ``Steps:``/``Model:`` line; the ``darkroom`` JSON keeps it verbatim.
- JPEG's EXIF segment holds at most 64 KB, so the EXIF text is capped at :data:`EXIF_TEXT_LIMIT_BYTES`
  (UTF-16, as UserComment stores it): beyond it the prompt and negative prompt are shortened, each ending
  in :data:`TRUNCATED_MARKER`, and the settings line is kept whole. The same cap applies to WebP, so both
  formats carry the same text. The full request is always on the job (and in a PNG's ``darkroom`` chunk).
Anything the encoder still raises is :class:`worker.errors.EncodingFailed`: the job's own failure.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from schemas.generation import GenerationRequest, OutputFormat
from schemas.images import decode_base64_image
from worker.errors import EncodingFailed

PARAMETERS_KEY = "parameters"
DARKROOM_KEY = "darkroom"
_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286
_SAMPLER = "Euler"  # SD3's FlowMatchEulerDiscreteScheduler
_UNICODE_PREFIX = b"UNICODE\x00"  # UserComment's character code: UCS-2/UTF-16
#: The most bytes of A1111 text (UTF-16) the EXIF UserComment of a JPEG or WebP carries: 30,000 UTF-16 code
#: units — about 30,000 characters of most scripts, 15,000 emoji. JPEG's EXIF segment ends at 65,533 bytes.
EXIF_TEXT_LIMIT_BYTES = 60_000
#: Ends a prompt shortened to fit :data:`EXIF_TEXT_LIMIT_BYTES`.
TRUNCATED_MARKER = "…[truncated]"
#: Every line boundary ``str.splitlines`` knows (CR LF counted once): none may reach the A1111 text.
_LINE_BREAKS = re.compile(r"\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    content_type: str
    extension: str
    sha256: str
    width: int
    height: int
    seed: int


def _a1111_value(value: object) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or '"' in text) else text


def one_line(text: str) -> str:
    """``text`` with every line break replaced by a space."""
    return _LINE_BREAKS.sub(" ", text)


def _utf16_size(text: str) -> int:
    return len(text.encode("utf-16-be"))


def _clip(text: str, budget: int) -> str:
    """``text`` if it fits ``budget`` UTF-16 bytes, else its longest prefix (whole characters) that fits
    with :data:`TRUNCATED_MARKER` after it."""
    if _utf16_size(text) <= budget:
        return text
    room, kept = budget - _utf16_size(TRUNCATED_MARKER), 0
    for index, char in enumerate(text):
        size = 4 if ord(char) > 0xFFFF else 2
        if kept + size > room:
            return text[:index] + TRUNCATED_MARKER
        kept += size
    return text  # unreachable: the whole text did not fit


def _fit_prompts(prompt: str, negative: str | None, room: int) -> tuple[str, str | None]:
    """Shorten the prompts to ``room`` UTF-16 bytes in all: each gets half, and what one does not use
    goes to the other."""
    sizes = (_utf16_size(prompt), _utf16_size(negative or ""))
    if sum(sizes) <= room:
        return prompt, negative
    half = room // 2
    if sizes[0] <= half:
        prompt_room = sizes[0]
    elif sizes[1] <= half:
        prompt_room = room - sizes[1]
    else:
        prompt_room = half
    return _clip(prompt, prompt_room), (_clip(negative, room - prompt_room) if negative else negative)


def a1111_parameters(
    request: GenerationRequest, seed: int, model: str, *, limit_bytes: int | None = None
) -> str:
    """The ``parameters`` text A1111 writes: prompt, optional negative prompt line, then key: value pairs.

    Line breaks in the prompts become spaces (no prompt can add a line). ``limit_bytes``: the most UTF-16
    bytes the text may take; the prompts are shortened (:data:`TRUNCATED_MARKER`) to fit.
    """
    fields: dict[str, object] = {
        "Steps": request.num_inference_steps,
        "Sampler": _SAMPLER,
        "CFG scale": request.guidance_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model,
    }
    if request.is_image_to_image:
        fields["Denoising strength"] = request.strength
    slg = request.skip_layer_guidance
    if slg is not None:
        fields["SLG layers"] = ",".join(map(str, slg.layers))
        fields["SLG scale"] = slg.scale
        fields["SLG start"] = slg.start
        fields["SLG stop"] = slg.stop
    fields["Max sequence length"] = request.max_sequence_length
    fields["Version"] = "darkroom"
    settings = ", ".join(f"{key}: {_a1111_value(value)}" for key, value in fields.items())
    prompt = one_line(request.prompt)
    negative = one_line(request.negative_prompt) if request.negative_prompt else None
    if limit_bytes is not None:
        fixed = _utf16_size("\n" + settings) + (_utf16_size("\nNegative prompt: ") if negative else 0)
        prompt, negative = _fit_prompts(prompt, negative, max(0, limit_bytes - fixed))
    lines = [prompt, *([f"Negative prompt: {negative}"] if negative else []), settings]
    return "\n".join(lines)


def darkroom_metadata(request: GenerationRequest, seed: int, index: int, model: str) -> dict[str, Any]:
    """The full request as JSON; the init image and mask are replaced by the sha256 of their image files
    (they can be megabytes): the files as the client sent them and as ``init_image_url`` /
    ``mask_image_url`` serve them, however the base64 was wrapped or prefixed."""
    payload = request.model_dump(mode="json", exclude={"init_image", "mask_image"})
    if request.init_image is not None:
        payload["init_image_sha256"] = hashlib.sha256(decode_base64_image(request.init_image)).hexdigest()
    if request.mask_image is not None:
        payload["mask_image_sha256"] = hashlib.sha256(decode_base64_image(request.mask_image)).hexdigest()
    return {"request": payload, "model": model, "seed": seed, "image_index": index}


def encode_image(
    image: Image.Image, request: GenerationRequest, seed: int, index: int, model: str
) -> EncodedImage:
    """Encode one image with its metadata; raises :class:`EncodingFailed` (the job's own failure)."""
    try:
        return _encode(image, request, seed, index, model)
    except Exception as exc:
        raise EncodingFailed(
            f"image {index} could not be encoded as {request.output_format.value}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _encode(
    image: Image.Image, request: GenerationRequest, seed: int, index: int, model: str
) -> EncodedImage:
    fmt = request.output_format
    buffer = io.BytesIO()
    if fmt is OutputFormat.PNG:
        parameters = a1111_parameters(request, seed, model)
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, parameters)
        info.add_text(
            DARKROOM_KEY, json.dumps(darkroom_metadata(request, seed, index, model), sort_keys=True)
        )
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        parameters = a1111_parameters(request, seed, model, limit_bytes=EXIF_TEXT_LIMIT_BYTES)
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_EXIF_USER_COMMENT] = _UNICODE_PREFIX + parameters.encode("utf-16-be")
        quality = request.output_quality or 90
        pil_format = "JPEG" if fmt is OutputFormat.JPEG else "WEBP"
        image.convert("RGB").save(buffer, format=pil_format, quality=quality, exif=exif.tobytes())
    data = buffer.getvalue()
    return EncodedImage(
        data=data,
        content_type=fmt.content_type,
        extension=fmt.extension,
        sha256=hashlib.sha256(data).hexdigest(),
        width=image.width,
        height=image.height,
        seed=seed,
    )


def read_png_metadata(data: bytes) -> tuple[str, dict[str, Any]]:
    """The (parameters text, darkroom JSON) pair embedded in one of our PNGs."""
    with Image.open(io.BytesIO(data)) as image:
        text = dict(getattr(image, "text", {}))
    return text[PARAMETERS_KEY], json.loads(text[DARKROOM_KEY])


def read_exif_parameters(data: bytes) -> str:
    """The A1111 text embedded as EXIF UserComment in one of our JPEGs or WebPs."""
    with Image.open(io.BytesIO(data)) as image:
        comment = image.getexif().get_ifd(_EXIF_IFD)[_EXIF_USER_COMMENT]
    raw = comment if isinstance(comment, bytes) else str(comment).encode("latin-1")
    return raw.removeprefix(_UNICODE_PREFIX).decode("utf-16-be")
