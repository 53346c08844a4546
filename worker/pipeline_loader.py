"""Loading the SD3.5 pipeline once per worker process: hub id, local folder, or the offline tiny model.

Every source goes through the same ``StableDiffusion3Pipeline.from_pretrained`` call, so the code that loads
the real model in production is the code CI exercises with the tiny one. A model that cannot be loaded is a
clear :class:`ModelUnavailableError` naming the model and how to get it — never a silent swap.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from services.settings import TINY_MODEL, Settings
from worker.errors import ModelUnavailableError
from worker.loras import LoraAdapters
from worker.prompt_cache import PromptEmbeddingCache
from worker.quantization import load_quantized, quantized_components, require_nf4
from worker.tiny_model import ensure_tiny_model

log = logging.getLogger(__name__)

ModelSource = Literal["hub", "local", "tiny"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    """The warm pipeline plus what it was loaded from; image-to-image and inpainting share its components."""

    pipeline: Any  # StableDiffusion3Pipeline; diffusers ships no type information
    model: str
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    #: The LoRA adapters of DARKROOM_LORAS (None: none configured), loaded on first use (worker.loras).
    loras: LoraAdapters | None = field(default=None, repr=False)
    #: Text-encoder outputs of recent prompts (None: disabled); shared by both pipelines' encoders.
    prompt_cache: PromptEmbeddingCache | None = field(default=None, repr=False)
    #: What :func:`prepare_pipeline` applied (worker.optimizations), for logs and benchmarks.
    optimizations: dict[str, Any] = field(default_factory=dict, repr=False)
    _img2img: Any = field(default=None, repr=False)
    _inpaint: Any = field(default=None, repr=False)

    def img2img(self) -> Any:
        """The image-to-image pipeline over the *same* modules (``from_pipe``): no second copy of weights."""
        if self._img2img is None:
            from diffusers import StableDiffusion3Img2ImgPipeline

            self._img2img = StableDiffusion3Img2ImgPipeline.from_pipe(self.pipeline)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def inpaint(self) -> Any:
        """The inpainting pipeline over the *same* modules (``from_pipe``), built on first use."""
        if self._inpaint is None:
            from diffusers import StableDiffusion3InpaintPipeline

            self._inpaint = StableDiffusion3InpaintPipeline.from_pipe(self.pipeline)
            self._inpaint.set_progress_bar_config(disable=True)
        return self._inpaint


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA (SD3.5's native precision), fp32 on CPU (bf16 matmuls there are slow and lossy)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[setting]


def resolve_source(model: str) -> tuple[str, ModelSource]:
    """Where ``from_pretrained`` should read ``model`` from, and which kind of source it is."""
    if model == TINY_MODEL:
        return str(ensure_tiny_model()), "tiny"
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelUnavailableError(
                f"model folder {path} has no model_index.json: it is not a diffusers pipeline folder "
                "(save one with `huggingface-cli download stabilityai/stable-diffusion-3.5-medium "
                f"--local-dir {path}`)"
            )
        return str(path), "local"
    if model.startswith(("/", ".", "~")) or not _HUB_ID.match(model):
        raise ModelUnavailableError(
            f"DARKROOM_MODEL={model!r} is neither an existing folder nor a hub id like "
            "'stabilityai/stable-diffusion-3.5-medium' (or 'tiny' for the offline test model)"
        )
    return model, "hub"


def _how_to_get(model: str) -> str:
    return (
        f"To use {model!r}: accept its license on https://huggingface.co/{model}, "
        "then `huggingface-cli login` "
        f"(or set HF_TOKEN) on a machine with network access, or download it with `huggingface-cli download "
        f"{model} --local-dir /models/sd35m` and set DARKROOM_MODEL=/models/sd35m. "
        "For an offline smoke test only, DARKROOM_MODEL=tiny loads a random model whose images are noise."
    )


def load_pipeline(settings: Settings) -> LoadedModel:
    """Load the configured pipeline onto its device, in eval mode, ready for the first job."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Per-shard progress bars are noise in a service log; our own log line says what is loading.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    device = resolve_device(settings.device)
    # Small-GPU mode refuses before any weights are read (no CUDA, no bitsandbytes): worker.quantization.
    require_nf4(settings, device)
    location, source = resolve_source(settings.model)
    dtype = resolve_dtype(settings.dtype, device)
    extra: dict[str, Any] = {}
    if settings.drop_t5:
        extra.update(text_encoder_3=None, tokenizer_3=None)
    quantized = quantized_components(settings)
    log.info(
        "loading model %s from %s (%s) on %s as %s%s",
        settings.model,
        location,
        source,
        device,
        dtype,
        f" ({', '.join(quantized)} in 4-bit NF4)" if quantized else "",
    )
    try:
        # The quantised components (if any) load first, through diffusers'/transformers' BitsAndBytesConfig,
        # and are handed to the same pipeline call as everything else.
        extra.update(load_quantized(location, settings, device, dtype))
        pipeline = StableDiffusion3Pipeline.from_pretrained(location, dtype=dtype, **extra)
    except (OSError, ValueError) as exc:  # hub errors (gated, offline, not found) are OSError subclasses
        raise ModelUnavailableError(
            f"could not load model {settings.model!r} ({type(exc).__name__}: {exc}). "
            + _how_to_get(settings.model)
        ) from exc
    pipeline = prepare_pipeline(pipeline, settings)
    return LoadedModel(
        pipeline=pipeline,
        model=settings.model,
        source=source,
        device=device,
        dtype=dtype,
        loras=LoraAdapters(pipeline, settings.loras) if settings.loras else None,
        prompt_cache=PromptEmbeddingCache.from_settings(settings),
        optimizations=getattr(pipeline, "_darkroom_optimizations", {}),
    )


def prepare_pipeline(pipeline: Any, settings: Settings) -> Any:
    """Everything that happens to a pipeline after its weights are read: device placement (or CPU
    offload), eval mode, then the speed switches of :mod:`worker.optimizations` (TF32, SDPA kernels, fused
    QKV, channels-last VAE, FP8, ``torch.compile`` with its preset warm-up). Returns the pipeline.

    Split from :func:`load_pipeline` so that a pipeline built another way (the GPU bench's random full-size
    weights) is prepared exactly as the worker prepares a loaded one.
    """
    from worker.optimizations import apply_optimizations

    device = resolve_device(settings.device)
    if settings.cpu_offload and device.type != "cpu":
        pipeline.enable_model_cpu_offload(device=device)
    else:
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    started = time.perf_counter()
    applied = apply_optimizations(pipeline, settings, device)
    applied["seconds"] = round(time.perf_counter() - started, 3)
    pipeline._darkroom_optimizations = applied
    log.info("pipeline prepared: %s", applied)
    return pipeline
