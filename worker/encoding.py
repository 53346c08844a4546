"""Encoding generated images, with the parameters that made them embedded in the file.

People drag our PNGs into A1111/ComfyUI-style tools and expect the prompt and seed to come along, so PNGs
carry a ``parameters`` text chunk in the A1111 form plus a ``darkroom`` JSON chunk with the full normalised
request; JPEG and WebP carry the A1111 text as EXIF UserComment. Nothing time-dependent is embedded, so the
same pixels always encode to the same bytes (and the same sha256).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from schemas.generation import GenerationRequest, OutputFormat
from schemas.images import decode_base64_image

PARAMETERS_KEY = "parameters"
DARKROOM_KEY = "darkroom"
_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286
_SAMPLER = "Euler"  # SD3's FlowMatchEulerDiscreteScheduler


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


def a1111_parameters(request: GenerationRequest, seed: int, model: str) -> str:
    """The ``parameters`` text A1111 writes: prompt, optional negative prompt line, then key: value pairs."""
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
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(", ".join(f"{key}: {_a1111_value(value)}" for key, value in fields.items()))
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
    fmt = request.output_format
    parameters = a1111_parameters(request, seed, model)
    buffer = io.BytesIO()
    if fmt is OutputFormat.PNG:
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, parameters)
        info.add_text(
            DARKROOM_KEY, json.dumps(darkroom_metadata(request, seed, index, model), sort_keys=True)
        )
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_EXIF_USER_COMMENT] = b"UNICODE\x00" + parameters.encode("utf-16-be")
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
