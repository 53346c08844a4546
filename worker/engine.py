"""The generation engine: one warm pipeline that turns a normalised request into encoded, reproducible images.

Reproducibility is the contract: image ``i`` of a request is drawn from its own CPU ``torch.Generator`` seeded
``seed + i``, so it can be regenerated alone, on any device (CPU generators give the same noise
everywhere). Progress is reported after every denoising step; cancellation is checked at the same point
and raises, which skips the VAE decode a bare ``interrupt`` would still run.

A pipeline is not thread-safe: the engine serialises calls with a lock, and a worker process owns one engine.

Coalescing (:meth:`GenerationEngine.generate_group`): requests with the same :func:`coalesce_key` (size,
steps, guidance, skip-layer guidance, T5 length, LoRAs; text-to-image only) can share one pipeline call.
Each keeps its own prompt embeddings, seeds (one generator per image, so its noise is what it would be
alone), output format and metadata, progress callback and cancel check. A request canceled mid-call ends
at once: its rows leave the latents and embeddings at the next step (``callback_on_step_end`` may replace
them), so the others carry on with fewer rows — except under skip-layer guidance, whose second set of
embeddings the callback cannot reach: there its rows keep being computed and its images are dropped. A
coalesced call that runs out of memory (or that the pipeline refuses) is retried one request at a time.
The pixels of a coalesced request can differ slightly (a level or two) from the same request run alone:
batched kernels round differently, so "same request + same seed → same bytes" holds only alone.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from schemas.generation import GenerationRequest
from schemas.images import decode_base64_image, open_upright
from worker.encoding import EncodedImage, encode_image
from worker.errors import (
    EngineError,
    GenerationCanceled,
    GenerationOutOfMemory,
    InvalidGenerationRequest,
)
from worker.loras import activate_adapters
from worker.pipeline_loader import LoadedModel
from worker.prompt_cache import prompt_embeddings, with_prompt_embeddings
from worker.prompt_tokens import prompt_report

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
CanceledCallback = Callable[[GenerationCanceled], None]


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
#: A coalesced call that fails with one of these is run again one request at a time (each then fails, or
#: not, alone).
RETRY_ALONE_ERRORS: tuple[type[BaseException], ...] = (*OUT_OF_MEMORY_ERRORS, ValueError)


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: the same seed draws the same initial noise on every device."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def decode_init_image(value: str, mode: str = "RGB") -> Image.Image:
    """An init image or mask as the pipeline takes it: upright (EXIF orientation applied), in ``mode``."""
    return open_upright(decode_base64_image(value), mode)


@dataclass(frozen=True)
class CoalesceKey:
    """What requests must share to run in one pipeline call: everything that shapes the latents, the text
    embeddings, the timestep schedule or the guidance arithmetic. Prompts, seeds, image counts, output
    format and quality may differ."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    skip_layer_guidance: tuple[tuple[int, ...], float, float, float] | None
    max_sequence_length: int
    #: The LoRA adapter set (sorted name, scale) a request runs with: adapters apply to the shared
    #: transformer, so only requests with the same set can share a call.
    loras: tuple[tuple[str, float], ...] = ()


def coalesce_key(request: GenerationRequest) -> CoalesceKey | None:
    """The request's :class:`CoalesceKey`, or None if it always runs alone (image-to-image: its schedule
    depends on ``strength`` and its latents on its own init image)."""
    if request.is_image_to_image:
        return None
    width, height = request.resolved_size()
    slg = request.skip_layer_guidance
    return CoalesceKey(
        width=width,
        height=height,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        skip_layer_guidance=None if slg is None else (tuple(slg.layers), slg.scale, slg.start, slg.stop),
        max_sequence_length=request.max_sequence_length,
        loras=request.adapter_set(),
    )


class _AllCanceled(Exception):
    """Every request of a coalesced call was canceled: raised from the step callback to stop the pipeline."""


@dataclass
class _Member:
    """One request of a group, its callbacks, and its outcome once known."""

    request: GenerationRequest
    on_progress: ProgressCallback | None = None
    should_cancel: CancelCheck | None = None
    on_canceled: CanceledCallback | None = None
    outcome: GenerationResult | EngineError | None = None

    def wants_cancel(self) -> bool:
        return self.should_cancel is not None and self.should_cancel()

    def cancel(self, error: GenerationCanceled) -> None:
        self.outcome = error
        if self.on_canceled is not None:
            self.on_canceled(error)


def _keep_rows(tensors: dict[str, Any], keep: list[int], rows: int, guided: bool) -> dict[str, Any]:
    """The callback tensors with only the latent rows ``keep`` (of ``rows``). Under classifier-free
    guidance the embeddings hold the negative rows first, then the positive ones: keep both halves."""
    latents = tensors["latents"]
    index = torch.tensor(keep, device=latents.device)
    embedding_rows = keep + [rows + k for k in keep] if guided else keep
    embedding_index = torch.tensor(embedding_rows, device=tensors["prompt_embeds"].device)
    return {
        **tensors,
        "latents": latents.index_select(0, index),
        "prompt_embeds": tensors["prompt_embeds"].index_select(0, embedding_index),
        "pooled_prompt_embeds": tensors["pooled_prompt_embeds"].index_select(0, embedding_index),
    }


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
        if request.is_inpainting:
            pipeline = self.model.inpaint()
        elif request.is_image_to_image:
            pipeline = self.model.img2img()
        else:
            pipeline = self.model.pipeline
        token_counts, warnings = prompt_report(pipeline, request)
        seeds = request.image_seeds()
        kwargs = request.to_pipeline_kwargs()
        if self.model.prompt_cache is not None:  # repeated (negative) prompts skip the text encoders
            kwargs = with_prompt_embeddings(pipeline, self.model.prompt_cache, kwargs)
        if request.is_image_to_image:
            assert request.init_image is not None
            kwargs["image"] = decode_init_image(request.init_image)
        if request.mask_image is not None:  # white repaints, black keeps: diffusers' convention
            kwargs["mask_image"] = decode_init_image(request.mask_image, "L")
        if should_cancel is not None and should_cancel():
            raise GenerationCanceled("canceled before the first denoising step")
        # Exactly this request's adapters (none: all off), on the transformer every pipeline shares.
        activate_adapters(self.model.loras, request.adapter_set())

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

    def generate_group(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_progress: Sequence[ProgressCallback | None] | None = None,
        should_cancel: Sequence[CancelCheck | None] | None = None,
        on_canceled: Sequence[CanceledCallback | None] | None = None,
    ) -> list[GenerationResult | EngineError]:
        """Generate a group of N >= 1 requests: one alone (any kind), or several with one
        :func:`coalesce_key` in one pipeline call.

        The callbacks are per request (same order as ``requests``). Returns one outcome per request: its
        result, or the :class:`EngineError` that ended it (canceled, out of memory, invalid, its images
        could not be encoded) — one
        request's failure is not the others'. ``on_canceled[i]`` is called as soon as request ``i`` is
        known to be canceled (before the first step, or after the step its cancel check said so), while
        the others go on. Anything else raised (a bug) propagates and concerns the whole group.
        """
        normalized = [r if r.seed is not None and r.width is not None else r.normalized() for r in requests]
        if not normalized:
            raise ValueError("generate_group needs at least one request")
        keys = {coalesce_key(request) for request in normalized}
        if len(normalized) > 1 and (None in keys or len(keys) != 1):
            raise ValueError("a group of several requests needs text-to-image requests with one coalesce_key")
        count = len(normalized)
        progress = list(on_progress) if on_progress is not None else [None] * count
        cancels = list(should_cancel) if should_cancel is not None else [None] * count
        canceled = list(on_canceled) if on_canceled is not None else [None] * count
        if not len(progress) == len(cancels) == len(canceled) == count:
            raise ValueError("one callback (or None) per request")
        members = [
            _Member(request, progress[i], cancels[i], canceled[i]) for i, request in enumerate(normalized)
        ]
        with self._lock:
            if count == 1:
                self._run_alone(members[0])
            else:
                self._generate_coalesced(members)
        outcomes = [member.outcome for member in members]
        assert all(outcome is not None for outcome in outcomes)
        return [outcome for outcome in outcomes if outcome is not None]

    def _run_alone(self, job: _Member) -> None:
        try:
            job.outcome = self._generate(job.request, job.on_progress, job.should_cancel)
        except GenerationCanceled as exc:
            job.cancel(exc)
        except EngineError as exc:
            job.outcome = exc

    def _prompt_embeddings(self, pipeline: Any, request: GenerationRequest) -> tuple[Any, Any, Any, Any]:
        """(prompt, negative, pooled, negative pooled) embeddings of one request, ``num_images`` rows each:
        what the pipeline computes for it inside a call of its own (through the prompt cache if on)."""
        return prompt_embeddings(
            pipeline,
            self.model.prompt_cache,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            num_images=request.num_images,
            guided=request.guidance_scale > 1,
            max_sequence_length=request.max_sequence_length,
        )

    def _generate_coalesced(self, jobs: list[_Member]) -> None:
        """Fill in every job's outcome (the lock is held)."""
        started = time.perf_counter()
        for job in jobs:
            if job.wants_cancel():
                job.cancel(GenerationCanceled("canceled before the first denoising step"))
        live = [job for job in jobs if job.outcome is None]
        if len(live) <= 1:
            for job in live:
                self._run_alone(job)
            return
        pipeline = self.model.pipeline
        try:  # one coalesce_key, so one adapter set for every request
            activate_adapters(self.model.loras, live[0].request.adapter_set())
        except EngineError as exc:
            for job in live:
                job.outcome = exc
            return
        reports = [prompt_report(pipeline, job.request) for job in live]
        guided = live[0].request.guidance_scale > 1
        embeddings = [self._prompt_embeddings(pipeline, job.request) for job in live]
        kwargs = live[0].request.to_pipeline_kwargs()
        for name in ("prompt", "negative_prompt", "num_images_per_prompt"):
            kwargs.pop(name)
        kwargs["prompt_embeds"] = torch.cat([e[0] for e in embeddings])
        kwargs["pooled_prompt_embeds"] = torch.cat([e[2] for e in embeddings])
        if guided:
            kwargs["negative_prompt_embeds"] = torch.cat([e[1] for e in embeddings])
            kwargs["negative_pooled_prompt_embeds"] = torch.cat([e[3] for e in embeddings])
        # The job behind each latent row, in order; rows leave when their job is canceled (if they can).
        rows = [job for job in live for _ in range(job.request.num_images)]
        shrinkable = "skip_guidance_layers" not in kwargs
        seeds = [seed for job in live for seed in job.request.image_seeds()]

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            running = [job for job in live if job.outcome is None]
            for job in running:
                if job.on_progress is not None:
                    job.on_progress(step + 1, int(pipe.num_timesteps))
            stopping = [job for job in running if job.wants_cancel()]
            for job in stopping:
                job.cancel(GenerationCanceled(f"canceled after denoising step {step + 1}"))
            if not stopping:
                return tensors
            if len(stopping) == len(running):
                pipe._interrupt = True
                raise _AllCanceled
            if not shrinkable:  # the canceled rows ride along to the end; their images are dropped
                return tensors
            keep = [index for index, job in enumerate(rows) if job.outcome is None]
            tensors = _keep_rows(tensors, keep, len(rows), guided)
            rows[:] = [rows[index] for index in keep]
            return tensors

        try:
            with torch.inference_mode():
                output = pipeline(
                    **kwargs,
                    num_images_per_prompt=1,
                    generator=image_generators(seeds),
                    callback_on_step_end=on_step_end,
                    callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "pooled_prompt_embeds"],
                    output_type="pil",
                )
        except _AllCanceled:
            return
        except RETRY_ALONE_ERRORS as exc:
            # Out of memory (or a request the pipeline refuses): one at a time, each on its own terms.
            self._free_device_memory()
            pending = [job for job in live if job.outcome is None]
            log.warning(
                "coalesced call of %d failed (%s); running them one by one", len(pending), type(exc).__name__
            )
            for job in pending:
                self._run_alone(job)
            return
        denoised = time.perf_counter()
        for job, (token_counts, warnings) in zip(live, reports, strict=True):
            if job.outcome is not None:  # canceled mid-call (under skip-layer guidance: rows rode along)
                continue
            encode_started = time.perf_counter()
            mine = [image for image, owner in zip(output.images, rows, strict=True) if owner is job]
            seeds = job.request.image_seeds()
            try:  # an image that cannot be encoded fails its own job, not the group's
                images = [
                    encode_image(image, job.request, seed, index, self.model.model)
                    for index, (image, seed) in enumerate(zip(mine, seeds, strict=True))
                ]
            except EngineError as exc:
                job.outcome = exc
                continue
            job.outcome = GenerationResult(
                images=images,
                warnings=warnings,
                token_counts=token_counts,
                timings={
                    "generate_s": denoised - started,
                    "encode_s": time.perf_counter() - encode_started,
                    "coalesced": float(len(live)),
                },
            )

    def _free_device_memory(self) -> None:
        """Drop what the failed call left behind so the next job starts from a clean cache."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
