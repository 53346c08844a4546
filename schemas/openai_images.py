"""OpenAI's Images API (``POST /v1/images/generations``) as a thin skin over our generation request.

The official ``openai`` SDKs work against this server by changing ``base_url``: the request mirrors OpenAI's
fields, and :meth:`ImageGenerationRequest.generation` turns it into the ``CreateGeneration`` our own endpoint
takes, so both endpoints share one set of rules. OpenAI fields we cannot honour are refused with a message
that says why (``background=transparent``, ``output_format=gif``, ``stream=true``); those that are only hints
(``style``, ``moderation``, ``user``) are accepted and have no effect. Fields our request names differently
report their errors under the OpenAI name (``width`` → ``size``, ``num_images`` → ``n``).

Errors keep our RFC 9457 problem shape and add OpenAI's ``error`` object as an extension member
(:func:`openai_error`), so ``openai.APIStatusError`` carries our message while problem-aware clients see
nothing new.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from annotated_types import Ge, Le
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from schemas.base import ResponseModel
from schemas.generation import (
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    GenerationRequest,
    LoraRequest,
    OutputFormat,
    json_number,
)
from schemas.jobs import CreateGeneration
from schemas.problems import Problem
from schemas.sizes import MAX_MEGAPIXELS, MAX_SIDE, MIN_MEGAPIXELS, MIN_SIDE, SIZE_MULTIPLE, size_problem

SERVED_MODEL_ALIAS = "sd3.5-medium"
"""Accepted as ``model`` for the server's default model, beside every served model's own name."""

#: OpenAI's own sizes that SD3.5-Medium can draw as they are (256x256, at 0.07 MP, is too small for it).
STANDARD_SIZES = ("1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792", "512x512")
#: ``quality`` as a preset of ``num_inference_steps``; ``auto``, ``standard`` and ``medium`` keep our default.
QUALITY_STEPS: dict[str, int] = {"low": 20, "high": 50, "hd": 50, "xhigh": 60, "max": 80}
#: Where an error of a ``CreateGeneration`` field belongs in OpenAI's terms.
OPENAI_FIELD_NAMES = {
    "num_images": "n",
    "width": "size",
    "height": "size",
    "output_quality": "output_compression",
}
OpenAIQuality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def _limits(name: str) -> dict[str, Any]:
    """``ge``/``le`` of a ``GenerationRequest`` field, so both endpoints state (and keep) the same ranges."""
    limits: dict[str, Any] = {}
    for constraint in GenerationRequest.model_fields[name].metadata:
        if isinstance(constraint, Ge):
            limits["ge"] = constraint.ge
        elif isinstance(constraint, Le):
            limits["le"] = constraint.le
    return limits


def _refuse(value: Any, unsupported: dict[Any, str]) -> Any:
    """Values OpenAI knows but we cannot honour get a reason instead of a bare "Input should be ..."."""
    if isinstance(value, str | bool) and value in unsupported:
        raise ValueError(unsupported[value])
    return value


def size_help() -> str:
    return (
        f"use 'auto' or WIDTHxHEIGHT with sides multiples of {SIZE_MULTIPLE} in {MIN_SIDE}..{MAX_SIDE} and "
        f"{MIN_MEGAPIXELS}..{MAX_MEGAPIXELS} megapixels, e.g. {', '.join(STANDARD_SIZES)}"
    )


class ImageGenerationRequest(BaseModel):
    """The body of ``POST /v1/images/generations``, as the ``openai`` SDK's ``images.generate`` sends it."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    model: str | None = Field(
        None,
        max_length=512,
        description=f"A served model (GET /v1/models) or '{SERVED_MODEL_ALIAS}' for the default one; "
        "default: the default one.",
    )
    n: int | None = Field(None, **_limits("num_images"), description="Number of images (default 1).")
    size: str | None = Field(
        None,
        max_length=11,
        json_schema_extra={"pattern": f"^(auto|{_SIZE.pattern})$"},
        description="'auto' (1024x1024) or WIDTHxHEIGHT: sides multiples of 16 in 256..2048, 0.25..2.1 MP; "
        "all of OpenAI's sizes but 256x256 qualify.",
        examples=["1024x1024"],
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="b64_json (default, as for OpenAI's GPT image models) or url (signed, expiring)."
    )
    quality: OpenAIQuality | None = Field(
        None,
        description="A preset of num_inference_steps: low 20, auto/standard/medium 40 (default), high/hd 50, "
        "xhigh 60, max 80.",
    )
    style: Literal["vivid", "natural"] | None = Field(
        None, description="Accepted and ignored (DALL-E 3 only)."
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Default png.")
    output_compression: int | None = Field(
        None, ge=0, le=100, description="jpeg/webp quality, 0..100 (0 is taken as 1); default 90."
    )
    background: Literal["opaque", "auto"] | None = Field(
        None, description="Images are always opaque; 'transparent' is refused."
    )
    moderation: Literal["low", "auto"] | None = Field(
        None, description="Accepted and ignored: this server applies no content moderation."
    )
    stream: Literal[False] | None = Field(
        None, description="Streaming is not offered; follow /v1/generations/{id}/events instead."
    )
    partial_images: Literal[0] | None = Field(None, description="Only without streaming: 0 or absent.")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored (not stored).")
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    # darkroom extensions (the openai SDK sends them with extra_body={...}); same rules as /v1/generations.
    seed: int | None = Field(
        None,
        ge=0,
        le=2**32 - 1,
        description="darkroom extension: seed of the first image (image i: seed + i).",
    )
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="darkroom extension: what to steer away from."
    )
    num_inference_steps: int | None = Field(
        None, **_limits("num_inference_steps"), description="darkroom extension; not together with quality."
    )
    guidance_scale: float | None = Field(
        None,
        **_limits("guidance_scale"),
        allow_inf_nan=False,
        description="darkroom extension (default 4.5).",
    )
    loras: list[LoraRequest] | None = Field(
        None,
        max_length=MAX_LORAS,
        description="darkroom extension: LoRA adapters [{name, scale}] from the server's list.",
    )

    @field_validator(
        "n",
        "output_compression",
        "seed",
        "num_inference_steps",
        "guidance_scale",
        "partial_images",
        mode="before",
    )
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        return json_number(value)

    @field_validator("size")
    @classmethod
    def _generable_size(cls, size: str | None) -> str | None:
        if size is None or size == "auto":
            return size
        match = _SIZE.fullmatch(size)
        if match is None:
            raise ValueError(f"size {size!r} is not 'auto' or WIDTHxHEIGHT; {size_help()}")
        problem = size_problem(int(match.group(1)), int(match.group(2)))
        if problem:
            raise ValueError(f"size {size} cannot be generated ({problem}); {size_help()}")
        return size

    @field_validator("output_format", mode="before")
    @classmethod
    def _known_formats(cls, value: Any) -> Any:
        reason = "{} output is not supported: use png, jpeg or webp"
        return _refuse(value, {fmt: reason.format(fmt) for fmt in ("gif", "svg")})

    @field_validator("output_compression")
    @classmethod
    def _compression_for_lossy(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("output_format") in (None, "png"):
            raise ValueError("output_compression applies to jpeg and webp only; set output_format")
        return value

    @field_validator("background", mode="before")
    @classmethod
    def _opaque(cls, value: Any) -> Any:
        return _refuse(value, {"transparent": "transparent backgrounds are not supported: images are opaque"})

    @field_validator("stream", mode="before")
    @classmethod
    def _no_stream(cls, value: Any) -> Any:
        return _refuse(
            value,
            {True: "streaming is not supported: follow GET /v1/generations/{id}/events for progress instead"},
        )

    @field_validator("partial_images", mode="before")
    @classmethod
    def _no_partials(cls, value: Any) -> Any:
        if value is not None and value != 0:
            raise ValueError("partial_images needs streaming, which this server does not offer")
        return value

    @field_validator("num_inference_steps")
    @classmethod
    def _steps_or_quality(cls, steps: int | None, info: ValidationInfo) -> int | None:
        if steps is not None and info.data.get("quality") not in (None, "auto"):
            raise ValueError("give quality or num_inference_steps, not both")
        return steps

    # --- mapping ---------------------------------------------------------------------------------------

    @property
    def wants_url(self) -> bool:
        return self.response_format == "url"

    def dimensions(self) -> tuple[int, int] | None:
        """(width, height) asked for, or None for the default size."""
        match = _SIZE.fullmatch(self.size or "")
        return (int(match.group(1)), int(match.group(2))) if match else None

    def generation(self, model: str | None = None) -> CreateGeneration:
        """The equivalent ``POST /v1/generations`` body; only what the client chose is set, so defaults
        are the same as for a native request (and Idempotency-Key fingerprints, taken with defaults
        filled in, match one that spells them out).

        Raises pydantic's ``ValidationError`` for rules only the generation request knows (a blank prompt,
        a negative prompt without guidance); :func:`openai_field_errors` renames its fields.
        """
        values: dict[str, Any] = {"prompt": self.prompt}
        if model is not None:
            values["model"] = model
        if self.n is not None:
            values["num_images"] = self.n
        if (dimensions := self.dimensions()) is not None:
            values["width"], values["height"] = dimensions
        if self.output_format is not None:
            values["output_format"] = self.output_format
        if self.output_compression is not None:
            values["output_quality"] = max(1, self.output_compression)
        if self.quality in QUALITY_STEPS:
            values["num_inference_steps"] = QUALITY_STEPS[self.quality]
        for name in ("seed", "negative_prompt", "num_inference_steps", "guidance_scale"):
            if (value := getattr(self, name)) is not None:
                values[name] = value
        if self.loras is not None:
            values["loras"] = [lora.model_dump() for lora in self.loras]
        return CreateGeneration.model_validate(values)


def openai_field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """The errors of :meth:`ImageGenerationRequest.generation`, located (``("body", field)``) under the
    names the client sent; the offending input is left out, as everywhere in our error answers."""
    errors = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = tuple(error.get("loc", ()))
        head = OPENAI_FIELD_NAMES.get(str(loc[0]), loc[0]) if loc else "body"
        errors.append({**error, "loc": ("body", head, *loc[1:])})
    return errors


def served_model_name(model: str, served: Sequence[str]) -> str | None:
    """The served model an OpenAI ``model`` names — one of ``served`` (the default first), or our alias
    for the default — or None when it names none of them."""
    if model in served:
        return model
    return served[0] if model == SERVED_MODEL_ALIAS and served else None


# --- responses ------------------------------------------------------------------------------------------


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="The image, base64-encoded (response_format=b64_json).")
    url: str | None = Field(None, description="Signed, expiring URL of the image (response_format=url).")
    revised_prompt: str | None = Field(None, description="Never set: prompts are used as given.")
    seed: int = Field(description="darkroom extension: the seed this image was drawn with.")
    finish_reason: Literal["stop", "content_filtered"] = Field(
        "stop",
        description="darkroom extension: 'content_filtered' = withheld by the content filter, so this entry "
        "has neither b64_json nor url (kept in place so data[i] stays image i).",
    )


class ImagesResponse(ResponseModel):
    """OpenAI's ``ImagesResponse``, plus the darkroom job ``id`` (readable at ``/v1/generations/{id}``)."""

    created: int = Field(description="Unix time the images were finished.")
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    size: str = Field(description="WIDTHxHEIGHT of the images.")
    id: str = Field(description="darkroom extension: the generation job, at /v1/generations/{id}.")


class OpenAIError(BaseModel):
    """OpenAI's error object, as its SDKs read it from ``{"error": {...}}``."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAICompatibleProblem(Problem):
    """Problem details as the OpenAI-compatible routes send them: with OpenAI's ``error`` object as an
    extension member, which is where the ``openai`` SDKs read an error's message, code and param."""

    error: OpenAIError


def openai_error(problem: Problem) -> OpenAIError:
    """The ``error`` member added to problem details on OpenAI-compatible routes.

    ``message`` is all a client of the SDK sees (``APIStatusError.message``), so it carries the field-level
    causes too — those the detail does not already say: a rule violation's detail is often its one field's
    message (``model_not_found``, ``lora_not_found``), and repeating it reads like a stutter. ``code`` is
    our stable problem code and ``param`` the first offending field.
    """
    message = problem.detail or problem.title
    causes = [error for error in problem.errors or [] if error.message not in message]
    if causes:
        message += " " + "; ".join(f"{error.field}: {error.message}" for error in causes)
    return OpenAIError(
        message=message,
        type="invalid_request_error" if problem.status < 500 else "server_error",
        param=problem.errors[0].field if problem.errors else None,
        code=problem.code,
    )
