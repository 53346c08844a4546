"""The generation engine: one warm pipeline that turns a normalised request into encoded, reproducible images.

Reproducibility is the contract: image ``i`` of a request is drawn from its own CPU ``torch.Generator`` seeded
``seed + i``, so it can be regenerated alone, in any batch, on any device (CPU generators give the same noise
everywhere). Progress is reported after every denoising step; cancellation is checked at the same point
and raises, which skips the VAE decode a bare ``interrupt`` would still run.

A pipeline is not thread-safe: the engine serialises calls with a lock, and a worker process owns one engine.
"""

from __future__ import annotations

import gc
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from schemas.generation import GenerationRequest
from worker.encoding import EncodedImage, encode_image
from worker.errors import GenerationCanceled, GenerationOutOfMemory, InvalidGenerationRequest
from worker.pipeline_loader import LoadedModel
from worker.prompt_tokens import prompt_report

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


@dataclass
class GenerationResult:
    images: list[EncodedImage]
    warnings: list[str]
    token_counts: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        errors.append(torch.OutOfMemoryError)
    return tuple(errors)


OUT_OF_MEMORY_ERRORS = _out_of_memory_errors()


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: the same seed draws the same initial noise on every device."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def decode_init_image(value: str) -> Image.Image:
    from schemas.images import decode_base64_image

    with Image.open(io.BytesIO(decode_base64_image(value))) as image:
        return image.convert("RGB")


class GenerationEngine:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._lock = threading.Lock()

    def warm_up(self) -> float:
        """Run one small generation so kernels, allocator pools and lazy imports are ready (seconds)."""
        started = time.perf_counter()
        request = GenerationRequest(prompt="warm-up", width=512, height=512, num_inference_steps=2, seed=0)
        self.generate(request)
        return time.perf_counter() - started

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        """Generate and encode every image of ``request`` (normalised here if it is not yet)."""
        if request.seed is None or request.width is None:
            request = request.normalized()
        with self._lock:
            return self._generate(request, on_progress, should_cancel)

    def _generate(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
    ) -> GenerationResult:
        started = time.perf_counter()
        pipeline = self.model.img2img() if request.is_image_to_image else self.model.pipeline
        token_counts, warnings = prompt_report(pipeline, request)
        seeds = request.image_seeds()
        kwargs = request.to_pipeline_kwargs()
        if request.is_image_to_image:
            assert request.init_image is not None
            kwargs["image"] = decode_init_image(request.init_image)
        if should_cancel is not None and should_cancel():
            raise GenerationCanceled("canceled before the first denoising step")

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_progress is not None:
                on_progress(step + 1, int(pipe.num_timesteps))
            if should_cancel is not None and should_cancel():
                pipe._interrupt = True  # belt and braces: the pipeline's own stop flag
                raise GenerationCanceled(f"canceled after denoising step {step + 1}")
            return tensors

        try:
            with torch.inference_mode():
                output = pipeline(
                    **kwargs,
                    generator=image_generators(seeds),
                    callback_on_step_end=on_step_end,
                    output_type="pil",
                )
        except OUT_OF_MEMORY_ERRORS as exc:
            self._free_device_memory()
            raise GenerationOutOfMemory(
                f"out of memory generating {request.num_images} image(s) at "
                f"{request.width}x{request.height}; "
                "try fewer images or a smaller size"
            ) from exc
        except ValueError as exc:  # the pipeline's own check_inputs: our schema should have caught it
            raise InvalidGenerationRequest(str(exc)) from exc
        denoised = time.perf_counter()
        images = [
            encode_image(image, request, seed, index, self.model.model)
            for index, (image, seed) in enumerate(zip(output.images, seeds, strict=True))
        ]
        finished = time.perf_counter()
        return GenerationResult(
            images=images,
            warnings=warnings,
            token_counts=token_counts,
            timings={"generate_s": denoised - started, "encode_s": finished - denoised},
        )

    def _free_device_memory(self) -> None:
        """Drop what the failed call left behind so the next job starts from a clean cache."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
