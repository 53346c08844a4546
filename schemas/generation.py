"""The public generation request: what a client may ask for, checked before anything reaches a GPU.

Like diffusers' ``check_inputs`` we refuse bad input with a clear error naming the field instead of quietly
fixing it, and we state the model's own limits (sizes divisible by 16, ``max_sequence_length <= 512``).
Cross-field rules are written as validators on the *later* field of each pair, so the error's location is a
field name a client can act on rather than the whole body.
"""

from __future__ import annotations

import base64
import secrets
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from schemas.base import SENT_IN_FULL
from schemas.images import probe_base64_image, vet_base64_image
from schemas.models import MODEL_NAME_PATTERN
from schemas.outpaint import Outpaint, outpaint_canvas
from schemas.sizes import (
    ASPECT_RATIO_SIZES,
    DEFAULT_ASPECT_RATIO,
    AspectRatio,
    fit_size,
    side_problem,
    size_problem,
)

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 10_000
SD35_MEDIUM_NUM_LAYERS = 24
# Validation context the worker uses to re-read a request the API already normalised: its init image is in
# storage, not inline, so `strength` stands alone there. A client-sent body never carries this context.
NORMALIZED_CONTEXT: dict[str, bool] = {"normalized": True}
MAX_LORAS = 4
MAX_LORA_SCALE = 2.0
#: What a LoRA name may look like (the same rule as DARKROOM_LORAS names).
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def json_number(value: Any) -> Any:
    """Refuse what pydantic's lax mode would coerce into a number: ``true`` is 1 and ``"512"`` is 512 to it,
    but neither is a JSON Schema integer/number, and both are client bugs worth reporting, not guessing at."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, str | bytes):
        raise ValueError("must be a JSON number, not a string")
    return value


class OutputFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"

    @property
    def extension(self) -> str:
        return "jpg" if self is OutputFormat.JPEG else self.value


class SkipLayerGuidance(BaseModel):
    """Skip-layer guidance, defaulting to the settings SD3.5-Medium is documented with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: list[Annotated[int, Field(ge=0, lt=SD35_MEDIUM_NUM_LAYERS)]] = Field(
        default_factory=lambda: [7, 8, 9], min_length=1, max_length=SD35_MEDIUM_NUM_LAYERS
    )
    scale: float = Field(2.8, ge=0, le=10, allow_inf_nan=False)
    start: float = Field(0.01, ge=0, le=1, allow_inf_nan=False)
    stop: float = Field(0.2, ge=0, le=1, allow_inf_nan=False)

    @field_validator("scale", "start", "stop", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        return json_number(value)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_are_numbers(cls, layers: Any) -> Any:
        if isinstance(layers, list):
            for layer in layers:
                json_number(layer)
        return layers

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, layers: list[int]) -> list[int]:
        if len(set(layers)) != len(layers):
            raise ValueError("layers must not repeat")
        return sorted(layers)

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.start >= self.stop:
            raise ValueError(f"start ({self.start}) must be below stop ({self.stop})")
        return self


class LoraRequest(BaseModel):
    """One LoRA adapter to apply, by the name the server lists it under (``DARKROOM_LORAS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=LORA_NAME_PATTERN, description="An adapter this server offers (its DARKROOM_LORAS names)."
    )
    scale: float = Field(
        1.0,
        ge=-MAX_LORA_SCALE,
        le=MAX_LORA_SCALE,
        allow_inf_nan=False,
        description=f"Strength: 1 as trained, 0 off; -{MAX_LORA_SCALE:g}..{MAX_LORA_SCALE:g}.",
    )

    @field_validator("scale", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        return json_number(value)


def _also_accepts_booleans(schema: dict[str, Any]) -> None:
    """Document the `true`/`false` shorthand the validator below accepts, for spec-generated clients."""
    schema["anyOf"].insert(0, {"type": "boolean"})


class GenerationRequest(BaseModel):
    """A text-to-image (or image-to-image) request, as clients send it and as the job stores it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, **SENT_IN_FULL)

    model: str | None = Field(
        None,
        pattern=MODEL_NAME_PATTERN,
        description="Which served model draws it (GET /v1/models lists them); default: the server's default.",
    )
    prompt: str = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw. Must contain non-blank text."
    )
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="What to steer away from (needs guidance_scale > 1)."
    )
    width: int | None = Field(
        None, description="Image width in pixels: a multiple of 16 in 256..2048. Give with height."
    )
    height: int | None = Field(
        None,
        validate_default=True,
        description="Image height in pixels: a multiple of 16 in 256..2048; width x height in 0.25..2.1 MP.",
    )
    aspect_ratio: AspectRatio | None = Field(
        None,
        validate_default=True,
        description="A ~1 megapixel preset size; not together with width/height. Default 1:1 (1024x1024).",
    )
    # The range as standard keywords for generators and linters; _seed_range checks it, with a message that
    # says what to do instead (a ge/le constraint would answer with pydantic's generic one).
    seed: Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0, "maximum": MAX_SEED})] | None = (
        Field(
            None,
            description="0..4294967295. Omitted: drawn by the server and returned. Image i uses seed + i.",
        )
    )
    num_inference_steps: int = Field(40, ge=1, le=100)
    guidance_scale: float = Field(4.5, ge=0, le=20, allow_inf_nan=False)
    skip_layer_guidance: SkipLayerGuidance | None = Field(
        None,
        validate_default=True,
        json_schema_extra=_also_accepts_booleans,
        description="true for SD3.5-M's documented settings (layers 7,8,9, scale 2.8, 0.01..0.2), "
        "or an object.",
    )
    loras: list[LoraRequest] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description=f"LoRA adapters to apply (at most {MAX_LORAS}, each name once), from the server's list.",
    )
    num_images: int = Field(1, ge=1, le=8)
    output_format: OutputFormat = OutputFormat.PNG
    output_quality: int | None = Field(
        None, ge=1, le=100, validate_default=True, description="JPEG/WebP quality (default 90)."
    )
    max_sequence_length: int = Field(256, ge=77, le=512, description="T5 prompt tokens the model reads.")
    init_image: str | None = Field(
        None, description="Base64 (or data: URL) PNG/JPEG/WebP to start from: image-to-image."
    )
    mask_image: str | None = Field(
        None,
        description="Inpainting: base64 (or data: URL) PNG/JPEG/WebP mask, exactly init_image's size. "
        "White repaints, black keeps (grey: in between). Needs init_image. Outpainting: pad init_image "
        "and paint the new border white.",
    )
    outpaint: Outpaint | None = Field(
        None,
        description="Outpainting: grow the canvas around init_image by {left, right, top, bottom} pixels "
        "(each 0..1024) and paint only the new border (the server draws the mask; not with mask_image). "
        "Default strength 1.0; the size follows the grown canvas.",
    )
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        validate_default=True,
        description="How far image-to-image departs from init_image, or inpainting from the masked area "
        "(default 0.6; 1.0 repaints the masked area from noise).",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must contain non-blank text")
        return prompt

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _encodable_text(cls, text: str | None) -> str | None:
        if text is None:
            return text
        if "\x00" in text:
            raise ValueError("must not contain NUL characters")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: would fail later, in a tokenizer or in Redis
            raise ValueError("must be valid Unicode text (no lone surrogates)") from None
        return text

    @field_validator("loras")
    @classmethod
    def _unique_loras(cls, loras: list[LoraRequest]) -> list[LoraRequest]:
        names = [lora.name for lora in loras]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"each LoRA may be listed once; repeated: {', '.join(repeated)}")
        return loras

    @field_validator(
        "seed",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "num_images",
        "output_quality",
        "max_sequence_length",
        "strength",
        mode="before",
    )
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        return json_number(value)

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, seed: int | None) -> int | None:
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be 0..{MAX_SEED}; omit it (or send null) for a random seed")
        return seed

    @field_validator("width", "height")
    @classmethod
    def _side_limits(cls, side: int | None, info: ValidationInfo) -> int | None:
        problem = None if side is None else side_problem(str(info.field_name), side)
        if problem:
            raise ValueError(problem)
        return side

    @field_validator("height")
    @classmethod
    def _size_pair(cls, height: int | None, info: ValidationInfo) -> int | None:
        if "width" not in info.data:  # width itself failed; its own error says why
            return height
        width = info.data["width"]
        if (width is None) != (height is None):
            raise ValueError("width and height must be given together")
        if width is not None and height is not None:
            problem = size_problem(width, height)
            if problem:
                raise ValueError(problem)
        return height

    @field_validator("aspect_ratio")
    @classmethod
    def _one_way_to_size(cls, ratio: AspectRatio | None, info: ValidationInfo) -> AspectRatio | None:
        if ratio is None or info.data.get("width") is None:
            return ratio
        raise ValueError("give either aspect_ratio or width and height, not both")

    @field_validator("skip_layer_guidance", mode="before")
    @classmethod
    def _slg_switch(cls, value: Any, info: ValidationInfo) -> Any:
        if value is True:
            value = SkipLayerGuidance()
        elif value is False:
            value = None
        guidance = info.data.get("guidance_scale")
        if value is not None and guidance is not None and guidance <= 1:
            raise ValueError("skip_layer_guidance needs classifier-free guidance: set guidance_scale > 1")
        return value

    @field_validator("output_quality")
    @classmethod
    def _quality_for_lossy(cls, quality: int | None, info: ValidationInfo) -> int | None:
        fmt = info.data.get("output_format")
        if quality is not None and fmt is OutputFormat.PNG:
            raise ValueError("output_quality applies to jpeg and webp only; png is lossless")
        return quality

    @field_validator("init_image")
    @classmethod
    def _init_image_decodes(cls, value: str | None) -> str | None:
        if value is not None:
            probe_base64_image(value)  # header only: the API decodes it off the event loop
        return value

    @field_validator("mask_image")
    @classmethod
    def _mask_fits_init_image(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        mask = probe_base64_image(value)
        # A stored (normalised) request keeps both images in storage, not inline: nothing to compare.
        if info.context == NORMALIZED_CONTEXT or "init_image" not in info.data:  # init_image's own error
            return value
        init_image = info.data["init_image"]
        if init_image is None:
            raise ValueError("mask_image applies to inpainting only: give init_image too")
        init = probe_base64_image(init_image)
        if (mask.width, mask.height) != (init.width, init.height):
            raise ValueError(
                f"mask_image is {mask.width}x{mask.height} but init_image is {init.width}x{init.height}: "
                "they must be the same size"
            )
        return value

    @field_validator("outpaint")
    @classmethod
    def _outpaint_grows_an_init_image(cls, value: Outpaint | None, info: ValidationInfo) -> Outpaint | None:
        # A stored (normalised) request ran with the grown canvas and its mask, kept in storage.
        if value is None or info.context == NORMALIZED_CONTEXT:
            return value
        if "init_image" in info.data and info.data["init_image"] is None:
            raise ValueError("outpaint grows an init image: give init_image too")
        if info.data.get("mask_image") is not None:
            raise ValueError("give outpaint or mask_image, not both: outpaint draws its own mask")
        return value

    @field_validator("strength")
    @classmethod
    def _strength_needs_image(cls, strength: float | None, info: ValidationInfo) -> float | None:
        # A stored (normalised) request keeps its init image in storage, not inline: strength stays valid.
        if info.context == NORMALIZED_CONTEXT:
            return strength
        if strength is not None and info.data.get("init_image") is None and "init_image" in info.data:
            raise ValueError("strength applies to image-to-image only: give init_image too")
        return strength

    @model_validator(mode="after")
    def _negative_prompt_needs_guidance(self) -> Self:
        if self.negative_prompt and self.guidance_scale <= 1:
            raise ValueError("negative_prompt has no effect without guidance: set guidance_scale > 1")
        return self

    # --- what the engine needs -------------------------------------------------------------------------

    @property
    def is_image_to_image(self) -> bool:
        """True for image-to-image and for inpainting (which starts from an init image too)."""
        return self.init_image is not None

    @property
    def is_inpainting(self) -> bool:
        return self.mask_image is not None

    def with_outpaint_canvas(self) -> GenerationRequest:
        """For ``outpaint``: a copy whose init image is the grown canvas and whose mask is the server's
        (an ordinary inpainting request from here on); otherwise ``self``. Decodes and re-encodes the
        image: off the event loop."""
        if self.outpaint is None or self.init_image is None or self.mask_image is not None:
            return self
        canvas, mask = outpaint_canvas(vet_base64_image(self.init_image).data, self.outpaint)
        return self.model_copy(
            update={
                "init_image": base64.b64encode(canvas).decode("ascii"),
                "mask_image": base64.b64encode(mask).decode("ascii"),
            }
        )

    def resolved_size(self) -> tuple[int, int]:
        """(width, height) this request will be generated at."""
        if self.width is not None and self.height is not None:
            return self.width, self.height
        if self.aspect_ratio is None and self.init_image is not None:
            image = probe_base64_image(self.init_image)  # its size is in the header
            return fit_size(image.width, image.height)
        return ASPECT_RATIO_SIZES[self.aspect_ratio or DEFAULT_ASPECT_RATIO]

    def normalized(self, seed: int | None = None, model: str | None = None) -> GenerationRequest:
        """A copy with every server-side default made explicit: the seed actually used, the exact size and
        (given ``model``, the server's default) the model that draws it.

        This is what a job stores and returns, so a client can replay it and get the same images.
        """
        width, height = self.resolved_size()
        chosen_seed = self.seed if self.seed is not None else seed
        if chosen_seed is None:
            chosen_seed = secrets.randbelow(MAX_SEED + 1)
        # aspect_ratio is resolved into width/height and dropped, so a client can replay job.request as is.
        updates: dict[str, Any] = {
            "seed": chosen_seed,
            "width": width,
            "height": height,
            "aspect_ratio": None,
        }
        if self.model is None and model is not None:
            updates["model"] = model
        if self.outpaint is not None and self.strength is None:
            updates["strength"] = 1.0  # the new border has nothing to keep
        elif self.is_image_to_image and self.strength is None:
            updates["strength"] = 0.6
        if self.output_format is not OutputFormat.PNG and self.output_quality is None:
            updates["output_quality"] = 90
        return self.model_copy(update=updates)

    def image_seeds(self) -> list[int]:
        """Seed of each image: ``seed + i``, wrapped so each one is itself a valid request seed."""
        if self.seed is None:
            raise ValueError("image_seeds() needs a normalized request (seed filled in)")
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    def adapter_set(self) -> tuple[tuple[str, float], ...]:
        """The LoRA adapters to activate as sorted (name, scale) pairs: the order a client lists them in
        changes nothing, so two requests with the same set compare (and are coalesced) as equal."""
        return tuple(sorted((lora.name, lora.scale) for lora in self.loras))

    def to_pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``StableDiffusion3Pipeline.__call__`` (generators and callbacks excluded)."""
        if self.width is None or self.height is None:
            raise ValueError("to_pipeline_kwargs() needs a normalized request (size filled in)")
        kwargs: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "num_images_per_prompt": self.num_images,
            "max_sequence_length": self.max_sequence_length,
        }
        slg = self.skip_layer_guidance
        if slg is not None:
            kwargs.update(
                skip_guidance_layers=list(slg.layers),
                skip_layer_guidance_scale=slg.scale,
                skip_layer_guidance_start=slg.start,
                skip_layer_guidance_stop=slg.stop,
            )
        if self.is_image_to_image:
            kwargs["strength"] = self.strength if self.strength is not None else 0.6
        return kwargs
