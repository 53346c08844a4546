"""``python -m bench.gpu --size full``: plain diffusers vs darkroom's worker generation path, same weights,
same process. ``--size tiny`` runs the same harness on CPU with the offline tiny model (smoke test only).

For each image size (1024 and 512 by default; 40 steps, CFG 4.5, no skip-layer guidance unless ``--slg``):
- plain: ``StableDiffusion3Pipeline.__call__`` with the same per-image CPU generators darkroom uses;
- darkroom: ``GenerationEngine.generate`` (token report, pipeline call with progress and cancel callbacks,
  PNG encoding) on the same pipeline object, wrapped the way the worker wraps it;
each at batch 1 (one image per call, ``--repeats`` calls) and on the batched path (``--batch`` different
prompts in one call: a prompt list for plain diffusers; for darkroom ``GenerationEngine.generate_group``,
the call a worker makes for jobs it coalesces (``DARKROOM_COALESCE_MAX``), when the engine has it, else one
request with ``num_images=--batch``, reported as such).

Reported: s/image and images/min, peak device memory, the transformer's achieved TFLOP/s (analytic FLOPs,
``bench.sd35_arch.transformer_flops``, over the time spent inside ``transformer.forward``) against a
measured dense matmul peak in the same dtype, and the relative L2 distance between the final latents of the
two paths for the same prompt and seed.

Plain runs first, then darkroom's preparation step (if the loader has one, it may change the pipeline in
place), then darkroom: a warm-up call precedes every measured configuration.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.common import Bar, machine_facts, print_bars, summary, write_results
from bench.sd35_arch import CLIP_TOKENS, image_flops, transformer_flops

PROMPTS = [
    "a red fox in the snow, golden hour, telephoto",
    "an isometric cutaway of a tiny bakery at night, warm light",
    "a watercolor map of an imaginary archipelago",
    "portrait of an astronaut made of glass, studio lighting",
    "a bowl of ramen on a wooden table, steam, 50mm",
    "a lighthouse at dusk, volumetric fog, 35mm photo",
    "a cyberpunk alley in the rain, neon reflections",
    "a macro photo of a dew drop on a leaf",
]
TARGET_SPEEDUP = 1.5
TARGET_S_PER_IMAGE = 2.2
TARGET_BATCH_GAIN = 2.0


@dataclass
class GpuPlan:
    size: str = "full"  # "full" (SD3.5-M architecture, random bf16 weights) or "tiny" (CPU smoke test)
    device: str = "auto"
    sizes: tuple[int, ...] = (1024, 512)
    steps: int = 40
    guidance: float = 4.5
    batch: int = 4
    repeats: int = 3
    batch_repeats: int = 2
    warmup: int = 1
    slg: bool = False
    max_sequence_length: int = 256
    #: Darkroom settings overridden for this run (``--set fuse_qkv=false``): measures one switch on vs off.
    overrides: dict[str, str] = field(default_factory=dict)

    def resolved_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        if self.size == "full":
            if not torch.cuda.is_available():
                raise SystemExit("--size full needs a CUDA device (use --size tiny on CPU)")
            return torch.device("cuda")
        return torch.device("cpu")

    def dtype(self, device: torch.device) -> torch.dtype:
        return torch.bfloat16 if device.type == "cuda" else torch.float32


# --- measuring -----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TransformerTimer:
    """Wall time spent inside ``transformer.forward`` (CUDA events on GPU), accumulated over calls."""

    def __init__(self, transformer: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self._pending: list[Any] = []
        self.seconds = 0.0
        self.calls = 0
        self._handles = [
            transformer.register_forward_pre_hook(self._before),
            transformer.register_forward_hook(self._after),
        ]

    def _before(self, module: Any, args: Any) -> None:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._pending.append([start, None])
        else:
            self._pending.append([time.perf_counter(), None])

    def _after(self, module: Any, args: Any, output: Any) -> None:
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending[-1][1] = end
        else:
            self._pending[-1][1] = time.perf_counter()
        self.calls += 1

    def collect(self) -> float:
        """Seconds accumulated since the last collect (synchronises the device)."""
        synchronize(self.device)
        total = 0.0
        for start, end in self._pending:
            if end is None:
                continue
            total += start.elapsed_time(end) / 1000.0 if self.device.type == "cuda" else end - start
        self._pending.clear()
        self.seconds += total
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class LatentTap:
    """The final latents of every pipeline call: captured at the VAE decoder's input and un-scaled."""

    def __init__(self, vae: Any) -> None:
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        self.captured: list[torch.Tensor] = []
        self._handle = vae.decoder.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: Any, args: Any, kwargs: Any) -> None:
        z = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self.captured.append((z.detach().float().cpu() - self.shift) * self.scaling)

    def take(self) -> list[torch.Tensor]:
        """One (C, H, W) latent per image, in order; clears the tap."""
        images = [latent for batch in self.captured for latent in batch]
        self.captured.clear()
        return images

    def remove(self) -> None:
        self._handle.remove()


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-12))


def matmul_peak(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Dense matmul throughput in ``dtype``: the roof the transformer's TFLOP/s is compared against."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    iterations = 20 if device.type == "cuda" else 5
    started = time.perf_counter()
    for _ in range(iterations):
        a @ b
    synchronize(device)
    elapsed = time.perf_counter() - started
    return {"n": n, "dtype": str(dtype), "tflops": round(2 * n**3 * iterations / elapsed / 1e12, 3)}


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1024**3, 2)
    return None


# --- the two paths -------------------------------------------------------------------------------------


def build_pipeline(plan: GpuPlan, device: torch.device, dtype: torch.dtype) -> Any:
    if plan.size == "full":
        from bench.sd35_arch import build_full_pipeline

        return build_full_pipeline(device, dtype)
    from worker.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline().to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def darkroom_model(
    pipe: Any, device: torch.device, dtype: torch.dtype, overrides: dict[str, str] | None = None
) -> tuple[Any, str]:
    """The worker's ``LoadedModel`` over ``pipe``, through the loader's preparation step when it has one.

    ``load_pipeline`` reads weights with ``from_pretrained``; random full-size weights have no folder, so the
    harness builds the pipeline itself and asks the loader to prepare it exactly as it prepares a loaded
    one (``worker.pipeline_loader.prepare_pipeline(pipeline, settings)``), so that any optimisation the
    worker applies after loading is measured too, with the worker's defaults unless ``overrides`` (setting
    name to value, as the ``DARKROOM_*`` variables spell them) switch some off or on.
    """
    from services.settings import Settings
    from worker import pipeline_loader
    from worker.prompt_cache import PromptEmbeddingCache

    settings = Settings(
        model="bench-random-sd3.5-medium",
        device=str(device),
        dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(dtype, "auto"),
        **(overrides or {}),  # type: ignore[arg-type]
    )

    quantized = load_quantized_like_the_worker(pipe, settings, device, dtype)
    prepare = getattr(pipeline_loader, "prepare_pipeline", None)
    if prepare is not None:
        prepared = prepare(pipe, settings)
        if isinstance(prepared, pipeline_loader.LoadedModel):
            return prepared, "worker.pipeline_loader.prepare_pipeline"
        pipe = prepared if prepared is not None else pipe
        how = "worker.pipeline_loader.prepare_pipeline" + quantized
    else:
        how = (
            "LoadedModel around the same pipeline: the loader has no prepare_pipeline step, so nothing "
            "load_pipeline might do after from_pretrained is included"
        )
        pipe.set_progress_bar_config(disable=True)
    model = pipeline_loader.LoadedModel(
        pipeline=pipe,
        model="bench-random-sd3.5-medium",
        source="local",
        device=device,
        dtype=dtype,
        prompt_cache=PromptEmbeddingCache.from_settings(settings),
        optimizations=getattr(pipe, "_darkroom_optimizations", {}),
    )
    return model, how


def load_quantized_like_the_worker(pipe: Any, settings: Any, device: torch.device, dtype: torch.dtype) -> str:
    """``--set quantize=nf4`` (``--set quantize_t5=true``): swap the components the worker would load in 4-bit
    for ones loaded exactly as it loads them (``worker.quantization.load_quantized``, i.e. ``from_pretrained``
    with diffusers'/transformers' ``BitsAndBytesConfig``). Random weights have no folder, so they are saved to
    a temporary one first; the bf16 originals are freed, so the darkroom path's peak memory is NF4's. Returns
    a note for the results ('' when nothing is quantised)."""
    import gc
    import tempfile

    from worker import quantization

    components = quantization.quantized_components(settings)
    if not components:
        return ""
    quantization.require_nf4(settings, device)
    with tempfile.TemporaryDirectory(prefix="darkroom-nf4-") as folder:
        for name in components:
            getattr(pipe, name).save_pretrained(f"{folder}/{name}")
        loaded = quantization.load_quantized(folder, settings, device, dtype)
    pipe.register_modules(**loaded)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return f" after load_quantized ({', '.join(components)} in 4-bit NF4)"


def _slg_kwargs(plan: GpuPlan) -> dict[str, Any]:
    if not plan.slg:
        return {}
    return {
        "skip_guidance_layers": [7, 8, 9],
        "skip_layer_guidance_scale": 2.8,
        "skip_layer_guidance_start": 0.01,
        "skip_layer_guidance_stop": 0.2,
    }


def plain_call(pipe: Any, plan: GpuPlan, size: int, prompts: list[str], seeds: list[int]) -> str:
    from worker.engine import image_generators

    with torch.inference_mode():
        pipe(
            prompt=prompts if len(prompts) > 1 else prompts[0],
            width=size,
            height=size,
            num_inference_steps=plan.steps,
            guidance_scale=plan.guidance,
            max_sequence_length=plan.max_sequence_length,
            generator=image_generators(seeds),
            output_type="pil",
            **_slg_kwargs(plan),
        )
    return "__call__(prompt list)" if len(prompts) > 1 else "__call__"


def _request(plan: GpuPlan, size: int, prompt: str, seed: int, num_images: int = 1) -> Any:
    from schemas.generation import GenerationRequest

    return GenerationRequest(
        prompt=prompt,
        width=size,
        height=size,
        num_inference_steps=plan.steps,
        guidance_scale=plan.guidance,
        seed=seed,
        num_images=num_images,
        max_sequence_length=plan.max_sequence_length,
        skip_layer_guidance=True if plan.slg else None,
    )


def darkroom_call(engine: Any, plan: GpuPlan, size: int, prompts: list[str], seeds: list[int]) -> str:
    """One darkroom call; returns which path it took."""
    if len(prompts) == 1:
        engine.generate(_request(plan, size, prompts[0], seeds[0]))
        return "generate"
    group = getattr(engine, "generate_group", None)
    if group is not None:
        # Separate compatible jobs, as a worker coalesces them: one request (prompt, seed) each.
        outcomes = group([_request(plan, size, p, s) for p, s in zip(prompts, seeds, strict=True)])
        failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failed:
            raise RuntimeError(
                f"generate_group: {len(failed)} of {len(outcomes)} requests failed"
            ) from failed[0]
        return "generate_group"
    # No multi-job path: one request with num_images (same prompt, seeds seed..seed+n-1).
    engine.generate(_request(plan, size, prompts[0], seeds[0], num_images=len(prompts)))
    return "generate(num_images)"


@dataclass
class Measured:
    seconds: list[float] = field(default_factory=list)
    transformer_s: list[float] = field(default_factory=list)
    peak_gib: float | None = None
    latents: list[list[torch.Tensor]] = field(default_factory=list)
    path: str = ""


def measure(
    run_once: Callable[[list[str], list[int]], Any],
    *,
    device: torch.device,
    timer: TransformerTimer,
    tap: LatentTap,
    images: int,
    repeats: int,
    warmup: int,
) -> Measured:
    """``warmup`` unrecorded calls, then ``repeats`` timed calls of ``images`` images each."""
    out = Measured()
    for index in range(warmup + repeats):
        prompts = [PROMPTS[(index * images + i) % len(PROMPTS)] for i in range(images)]
        if images == 1:
            prompts = [PROMPTS[index % len(PROMPTS)]]
        seeds = [100 + i for i in range(images)] if images > 1 else [100 + index]
        if index == warmup:
            peak_memory_reset(device)
        timer.collect()
        tap.take()
        synchronize(device)
        started = time.perf_counter()
        path = run_once(prompts, seeds)
        synchronize(device)
        elapsed = time.perf_counter() - started
        transformer_s = timer.collect()
        latents = tap.take()
        if index < warmup:
            continue
        out.seconds.append(elapsed)
        out.transformer_s.append(transformer_s)
        out.latents.append(latents)
        out.path = path or out.path
    out.peak_gib = peak_memory_gib(device)
    return out


def report(measured: Measured, images: int, flops_per_image: int, peak_tflops: float) -> dict[str, Any]:
    per_image = [s / images for s in measured.seconds]
    mean_per_image = sum(per_image) / len(per_image)
    transformer_per_image = sum(measured.transformer_s) / len(measured.transformer_s) / images
    achieved = flops_per_image / transformer_per_image / 1e12 if transformer_per_image else None
    return {
        "images_per_call": images,
        "calls": len(measured.seconds),
        "s_per_image": round(mean_per_image, 4),
        "s_per_image_summary": summary(per_image),
        "images_per_min": round(60.0 / mean_per_image, 2),
        "transformer_s_per_image": round(transformer_per_image, 4),
        "transformer_share": round(transformer_per_image / mean_per_image, 3),
        "transformer_tflops": round(achieved, 3) if achieved else None,
        "transformer_mfu": round(achieved / peak_tflops, 3) if achieved and peak_tflops else None,
        "pipeline_tflops": round(flops_per_image / mean_per_image / 1e12, 3),
        "peak_memory_gib": measured.peak_gib,
        "path": measured.path,
    }


def run_all(plan: GpuPlan) -> dict[str, Any]:
    device = plan.resolved_device()
    dtype = plan.dtype(device)
    results: dict[str, Any] = {"plan": {**plan.__dict__, "device": str(device), "dtype": str(dtype)}}
    if device.type == "cuda":
        results["gpu"] = {
            "name": torch.cuda.get_device_name(device),
            "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 1024**3, 1),
        }
    print(f"[gpu] building the {plan.size} pipeline on {device} as {dtype}", flush=True)
    started = time.perf_counter()
    pipe = build_pipeline(plan, device, dtype)
    synchronize(device)
    results["build_s"] = round(time.perf_counter() - started, 1)
    results["peak"] = matmul_peak(device, dtype)
    peak_tflops = results["peak"]["tflops"]
    text_tokens = CLIP_TOKENS + plan.max_sequence_length
    config = pipe.transformer.config
    slg_layers = (7, 8, 9) if plan.slg else ()
    flops = {
        size: image_flops(config, size, plan.steps, plan.guidance > 1, text_tokens, slg_layers)
        for size in plan.sizes
    }
    results["flops_per_image"] = {str(size): flops[size] for size in plan.sizes}
    results["flops_per_forward_batch1"] = {
        str(size): transformer_flops(config, size, size, text_tokens) for size in plan.sizes
    }

    runs: dict[str, dict[str, Measured]] = {"plain": {}, "darkroom": {}}
    timer = TransformerTimer(pipe.transformer, device)
    tap = LatentTap(pipe.vae)
    for size in plan.sizes:
        print(f"[gpu] plain diffusers {size}x{size}", flush=True)
        plain = functools.partial(plain_call, pipe, plan, size)
        runs["plain"][f"{size}/1"] = measure(
            plain,
            device=device,
            timer=timer,
            tap=tap,
            images=1,
            repeats=plan.repeats,
            warmup=plan.warmup,
        )
        runs["plain"][f"{size}/{plan.batch}"] = measure(
            plain,
            device=device,
            timer=timer,
            tap=tap,
            images=plan.batch,
            repeats=plan.batch_repeats,
            warmup=plan.warmup,
        )
    timer.remove()
    tap.remove()

    from worker.engine import GenerationEngine

    started = time.perf_counter()
    model, how = darkroom_model(pipe, device, dtype, plan.overrides)
    synchronize(device)
    results["darkroom_preparation"] = how
    results["darkroom_prepare_s"] = round(time.perf_counter() - started, 1)
    results["darkroom_optimizations"] = model.optimizations
    engine = GenerationEngine(model)
    timer = TransformerTimer(model.pipeline.transformer, device)
    tap = LatentTap(model.pipeline.vae)
    for size in plan.sizes:
        print(f"[gpu] darkroom {size}x{size}", flush=True)
        dark = functools.partial(darkroom_call, engine, plan, size)
        runs["darkroom"][f"{size}/1"] = measure(
            dark,
            device=device,
            timer=timer,
            tap=tap,
            images=1,
            repeats=plan.repeats,
            warmup=plan.warmup,
        )
        runs["darkroom"][f"{size}/{plan.batch}"] = measure(
            dark,
            device=device,
            timer=timer,
            tap=tap,
            images=plan.batch,
            repeats=plan.batch_repeats,
            warmup=plan.warmup,
        )
    timer.remove()
    tap.remove()

    results["runs"] = {
        path: {
            key: report(m, int(key.split("/")[1]), flops[int(key.split("/")[0])], peak_tflops)
            for key, m in by_key.items()
        }
        for path, by_key in runs.items()
    }
    results["agreement"] = agreement(runs, plan)
    return results


def agreement(runs: dict[str, dict[str, Measured]], plan: GpuPlan) -> dict[str, Any]:
    """Relative L2 of final latents: darkroom vs plain, same prompt and seed (batch-1 calls; the batched
    darkroom call against the plain batched call, image by image, when both drew the same prompts)."""
    out: dict[str, Any] = {}
    for size in plan.sizes:
        plain, dark = runs["plain"][f"{size}/1"], runs["darkroom"][f"{size}/1"]
        distances = [relative_l2(d[0], p[0]) for d, p in zip(dark.latents, plain.latents, strict=True)]
        entry: dict[str, Any] = {"batch1_rel_l2": [round(x, 6) for x in distances]}
        plain_b, dark_b = runs["plain"][f"{size}/{plan.batch}"], runs["darkroom"][f"{size}/{plan.batch}"]
        if dark_b.path == "generate_group" and plain_b.latents and dark_b.latents:
            entry["batched_rel_l2"] = [
                round(relative_l2(d, p), 6)
                for d, p in zip(dark_b.latents[0], plain_b.latents[0], strict=True)
            ]
        entry["finite"] = all(
            bool(torch.isfinite(x).all()) for m in (plain, dark) for call in m.latents for x in call
        )
        out[str(size)] = entry
    return out


def bars(results: dict[str, Any], plan: GpuPlan) -> list[Bar]:
    applies = plan.size == "full"
    note = "" if applies else "tiny model on CPU: not the target configuration"
    runs = results["runs"]
    found = []
    big, small = max(plan.sizes), min(plan.sizes)
    plain_1, dark_1 = runs["plain"][f"{big}/1"], runs["darkroom"][f"{big}/1"]
    found.append(
        Bar(
            f"{big}x{big} darkroom throughput over plain diffusers, batch 1",
            dark_1["images_per_min"] / plain_1["images_per_min"],
            ">=",
            TARGET_SPEEDUP,
            "x",
            note,
            applies=applies and big == 1024,
        )
    )
    found.append(
        Bar(
            f"{big}x{big} darkroom s/image, batch 1",
            dark_1["s_per_image"],
            "<=",
            TARGET_S_PER_IMAGE,
            "s",
            note,
            applies=applies and big == 1024,
        )
    )
    dark_b = runs["darkroom"][f"{small}/{plan.batch}"]
    dark_s = runs["darkroom"][f"{small}/1"]
    found.append(
        Bar(
            f"{small}x{small} {plan.batch} compatible jobs coalesced over one by one (darkroom, "
            f"path: {dark_b['path']})",
            dark_b["images_per_min"] / dark_s["images_per_min"],
            ">=",
            TARGET_BATCH_GAIN,
            "x",
            note,
            applies=applies and small == 512 and dark_b["path"] == "generate_group",
        )
    )
    return found


def print_summary(results: dict[str, Any]) -> None:
    print(
        f"\nmatmul peak: {results['peak']['tflops']} TFLOP/s "
        f"({results['peak']['dtype']}, n={results['peak']['n']})"
    )
    print(f"darkroom preparation: {results['darkroom_preparation']} ({results['darkroom_prepare_s']} s)")
    print(f"darkroom optimizations: {results['darkroom_optimizations']}")
    print(
        f"{'path':<9} {'config':<9} {'s/image':>9} {'img/min':>9} {'tfm TFLOP/s':>12} {'MFU':>6} "
        f"{'peak GiB':>9}  path"
    )
    for path, by_key in results["runs"].items():
        for key, r in by_key.items():
            print(
                f"{path:<9} {key:<9} {r['s_per_image']:>9.3f} {r['images_per_min']:>9.2f} "
                f"{r['transformer_tflops'] or 0:>12.3f} {r['transformer_mfu'] or 0:>6.3f} "
                f"{r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-':>9}  {r['path']}"
            )
    for size, entry in results["agreement"].items():
        print(f"agreement {size}: {entry}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", help="comma-separated square sizes (default 1024,512; tiny: 512)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 40; tiny: 4)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--repeats", type=int, help="timed batch-1 calls per configuration (default 3; tiny 2)"
    )
    parser.add_argument("--batch-repeats", type=int, help="timed batched calls (default 2; tiny 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--slg", action="store_true", help="skip-layer guidance on (SD3.5-M's settings)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a darkroom setting for the darkroom path, e.g. --set compile=false --set fp8=true",
    )
    parser.add_argument("--out", help="results JSON (default bench/results/gpu-<size>.json)")
    args = parser.parse_args(argv)
    tiny = args.size == "tiny"
    plan = GpuPlan(
        size=args.size,
        device=args.device,
        sizes=tuple(int(x) for x in args.sizes.split(","))
        if args.sizes
        else ((512,) if tiny else (1024, 512)),
        steps=args.steps or (4 if tiny else 40),
        batch=args.batch,
        repeats=args.repeats or (2 if tiny else 3),
        batch_repeats=args.batch_repeats or (1 if tiny else 2),
        warmup=args.warmup,
        slg=args.slg,
        overrides=dict(item.split("=", 1) for item in args.set),
    )
    facts = machine_facts()
    results = {"machine": facts, **run_all(plan)}
    results["bars"] = bars(results, plan)
    from pathlib import Path

    path = write_results(f"gpu-{plan.size}", results, Path(args.out) if args.out else None)
    print_summary(results)
    print_bars(results["bars"])
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
