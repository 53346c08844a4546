"""Making the loaded pipeline fast, one switch at a time (each a ``DARKROOM_*`` setting, each measurable).

Applied once per worker process by :func:`worker.pipeline_loader.prepare_pipeline`, in this order:

- precision flags: TF32 for what still runs in fp32 (weights are bf16 on CUDA already: ``DARKROOM_DTYPE``);
- attention: every attention module on ``F.scaled_dot_product_attention`` (diffusers' ``*AttnProcessor2_0``),
  optionally restricted to chosen SDPA kernels on CUDA (``DARKROOM_SDPA_BACKENDS=flash``);
- fused q/k/v projections (one matmul instead of three) in the transformer and the VAE;
- channels-last memory format for the VAE's convolutions;
- FP8 Linear layers in the transformer (opt-in, torchao, CUDA sm_89+): a *fast mode* whose difference is
  measured (``bench/gpu.py``: latent agreement beside the speed), never on by default (NF4 small-GPU mode,
  ``DARKROOM_QUANTIZE``, happens at load time instead: :mod:`worker.quantization`);
- ``torch.compile`` of the transformer and the VAE decoder with dynamic shapes (below), compiled kernels
  kept on disk (``DARKROOM_COMPILE_CACHE_DIR``), every aspect-ratio preset run once at start.

Dynamic shapes. The latent height and width, the batch and the text length are marked dynamic on every call
(``maybe_mark_dynamic``), so one graph serves all nine presets, every image count and every
``max_sequence_length``. PyTorch still specialises a batch of exactly 1 (its "0/1 specialisation"), so each
compiled module has at most two graphs: batch >= 2 (the transformer under classifier-free guidance always
sees 2 x images) and batch 1 (one image through the VAE; the transformer without guidance). The start-up
warm-up compiles both; skip-layer guidance's extra pass (``skip_layers``) compiles on its first use.
``tests/worker/test_optimizations.py`` proves that after the warm-up no preset or batch size compiles again.

Numerics: fused QKV, channels-last and SDPA kernel choice reorder floating-point sums only (fp32 on the
tiny model: relative L2 of final latents < 1e-5); TF32 and compile stay within the tolerances stated in
BENCHMARKS.md section 2; FP8 is opt-in with its measured agreement.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from services.settings import Settings
from worker.errors import ModelUnavailableError

log = logging.getLogger(__name__)

Switch = bool | Literal["auto"]
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
#: Processor classes that call ``F.scaled_dot_product_attention`` (diffusers' PyTorch 2.0 processors).
SDPA_PROCESSORS = {
    "AttnProcessor2_0",
    "FusedAttnProcessor2_0",
    "JointAttnProcessor2_0",
    "FusedJointAttnProcessor2_0",
    "FusedQKNormJointAttnProcessor",
}
WARMUP_STEPS = 2


class OptimizationUnavailable(ModelUnavailableError):
    """An explicitly requested optimisation cannot run here (FP8 without CUDA sm_89+ or without torchao)."""


def switch_on(value: Switch, device: torch.device) -> bool:
    """A setting that may be ``auto``: on for CUDA, off elsewhere; an explicit bool wins."""
    return device.type == "cuda" if value == "auto" else bool(value)


# --- precision and attention kernels -------------------------------------------------------------------


def set_tf32(enabled: bool) -> None:
    """TF32 tensor-core math for fp32 matmuls and convolutions (process-wide flags; no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def restrict_sdpa(backends: str) -> list[str]:
    """Allow only the named SDPA kernels on CUDA (process-wide); 'auto' leaves torch's choice. Returns the
    kernels left enabled."""
    if backends == "auto":
        return list(SDPA_BACKENDS)
    wanted = {name.strip() for name in backends.split(",")}
    unknown = wanted - set(SDPA_BACKENDS)
    if unknown:
        raise ValueError(f"unknown SDPA backend(s) {sorted(unknown)}; choose from {SDPA_BACKENDS}")
    torch.backends.cuda.enable_flash_sdp("flash" in wanted)
    torch.backends.cuda.enable_mem_efficient_sdp("efficient" in wanted)
    torch.backends.cuda.enable_cudnn_sdp("cudnn" in wanted)
    torch.backends.cuda.enable_math_sdp("math" in wanted)
    return [name for name in SDPA_BACKENDS if name in wanted]


def attention_processors(module: Any) -> dict[str, str]:
    """Processor class name per attention module (empty for modules without attention)."""
    processors = getattr(module, "attn_processors", None)
    if not processors:
        return {}
    return {name: type(processor).__name__ for name, processor in processors.items()}


def ensure_sdpa(pipeline: Any) -> dict[str, int]:
    """Put every attention module of the transformer and VAE on an SDPA processor (diffusers' default on
    PyTorch 2; a checkpoint or an earlier call may have set another). Returns processors per class."""
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

    counts: dict[str, int] = {}
    for name, default in (("transformer", JointAttnProcessor2_0), ("vae", AttnProcessor2_0)):
        module = getattr(pipeline, name, None)
        found = attention_processors(module)
        if any(cls not in SDPA_PROCESSORS for cls in found.values()):
            log.info("%s attention was not on SDPA (%s): switching", name, sorted(set(found.values())))
            module.set_attn_processor(default())  # type: ignore[union-attr]
            found = attention_processors(module)
        for cls in found.values():
            counts[cls] = counts.get(cls, 0) + 1
    return counts


# --- layout and weights ----------------------------------------------------------------------------------


class FusedQKNormJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (qk RMS-norm, SDPA, optional context stream) reading q/k/v from
    one fused ``to_qkv`` matmul and the context's from one ``to_added_qkv``: the same arithmetic otherwise.

    diffusers 0.42's own ``fuse_qkv_projections()`` is not usable on SD3.5-Medium: its
    ``FusedJointAttnProcessor2_0`` skips the qk RMS-norm (SD3.5 has ``qk_norm="rms_norm"``) and fails on the
    self-attention-only ``attn2`` of the dual-attention (MMDiT-X) blocks.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        import torch.nn.functional as F

        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            context_q, context_k, context_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            context_q, context_k, context_v = heads(context_q), heads(context_k), heads(context_v)
            if attn.norm_added_q is not None:
                context_q = attn.norm_added_q(context_q)
            if attn.norm_added_k is not None:
                context_k = attn.norm_added_k(context_k)
            query = torch.cat([query, context_q], dim=2)
            key = torch.cat([key, context_k], dim=2)
            value = torch.cat([value, context_v], dim=2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _share_fused_storage(fused: torch.nn.Linear, parts: list[torch.nn.Linear]) -> None:
    """Make the separate q/k/v Linears views of the fused one: fusing then costs no extra memory."""
    rows = 0
    for part in parts:
        count = part.weight.shape[0]
        part.weight = torch.nn.Parameter(fused.weight[rows : rows + count], requires_grad=False)
        if part.bias is not None and fused.bias is not None:
            part.bias = torch.nn.Parameter(fused.bias[rows : rows + count], requires_grad=False)
        rows += count


def fuse_transformer_qkv(transformer: Any) -> None:
    """One q/k/v matmul per stream in every attention module (see :class:`FusedQKNormJointAttnProcessor`)."""
    from diffusers.models.attention_processor import Attention

    for module in transformer.modules():
        if isinstance(module, Attention):
            module.fuse_projections(fuse=True)
            _share_fused_storage(module.to_qkv, [module.to_q, module.to_k, module.to_v])
            if getattr(module, "to_added_qkv", None) is not None:
                _share_fused_storage(
                    module.to_added_qkv, [module.add_q_proj, module.add_k_proj, module.add_v_proj]
                )
            module.set_processor(FusedQKNormJointAttnProcessor())  # type: ignore[arg-type]


def fuse_qkv(pipeline: Any, *, transformer_too: bool = True) -> list[str]:
    """Fuse the q/k/v projections of the transformer (unless ``transformer_too`` is False: LoRA adapters
    wrap its separate q/k/v Linears, which a fused processor would bypass) and the VAE; returns what was
    fused."""
    fused = []
    transformer = getattr(pipeline, "transformer", None) if transformer_too else None
    if transformer is not None and attention_processors(transformer):
        fuse_transformer_qkv(transformer)
        fused.append("transformer")
    vae = getattr(pipeline, "vae", None)
    if vae is not None and attention_processors(vae):
        vae.fuse_qkv_projections()
        fused.append("vae")
    return fused


def vae_channels_last(pipeline: Any) -> None:
    pipeline.vae.to(memory_format=torch.channels_last)


def quantize_fp8(transformer: Any, recipe: str, device: torch.device) -> None:
    """FP8 (e4m3) Linear layers in the transformer via torchao; refuses clearly where it cannot run."""
    if device.type != "cuda":
        raise OptimizationUnavailable(f"DARKROOM_FP8=true needs a CUDA device (this worker runs on {device})")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise OptimizationUnavailable(
            f"DARKROOM_FP8=true needs FP8 tensor cores (compute capability 8.9+: L4, L40S, H100); "
            f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}"
        )
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        raise OptimizationUnavailable(
            "DARKROOM_FP8=true needs torchao: pip install 'darkroom[worker,fp8]'"
        ) from exc
    config = (
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        if recipe == "dynamic"
        else Float8WeightOnlyConfig()
    )
    quantize_(transformer, config)


# --- torch.compile with dynamic shapes -------------------------------------------------------------------


def configure_compile_cache(cache_dir: Path | None) -> Path:
    """Keep inductor's compiled kernels (FX graph, AOTAutograd and Triton caches) under ``cache_dir``, so a
    restarted worker reuses them instead of compiling again."""
    folder = (cache_dir or Path.home() / ".cache" / "darkroom" / "compile").expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return folder


def _mark(tensor: Any, dims: tuple[int, ...]) -> None:
    if isinstance(tensor, torch.Tensor):
        for dim in dims:
            if dim < tensor.dim():
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


#: Per compiled module: which dims of which forward argument are dynamic (position or keyword).
TRANSFORMER_DYNAMIC = {
    "hidden_states": (0, (0, 2, 3)),  # batch, latent height, latent width
    "encoder_hidden_states": (1, (0, 1)),  # batch, CLIP + T5 tokens (77 + max_sequence_length)
    "pooled_projections": (2, (0,)),
    "timestep": (3, (0,)),
}
VAE_DECODER_DYNAMIC = {"sample": (0, (0, 2, 3))}


def compile_forward(
    module: torch.nn.Module,
    dynamic: Mapping[str, tuple[int, tuple[int, ...]]],
    *,
    mode: str = "default",
    backend: str | Callable[..., Any] = "inductor",
) -> None:
    """Replace ``module.forward`` with a compiled one that marks the dynamic dims of its inputs first.

    The module object stays what it was (its config, dtype, hooks and attributes are untouched), so the
    pipeline and anything hooking its ``forward`` (the GPU bench's timers) work the same compiled or not.
    """
    if getattr(module, "_darkroom_compiled", False):
        return
    options: dict[str, Any] = {"backend": backend, "dynamic": None}
    if backend == "inductor":
        options["mode"] = mode
    compiled = torch.compile(module.forward, **options)

    def forward(*args: Any, **kwargs: Any) -> Any:
        for name, (position, dims) in dynamic.items():
            _mark(kwargs[name] if name in kwargs else args[position] if position < len(args) else None, dims)
        return compiled(*args, **kwargs)

    module.forward = forward
    module._darkroom_compiled = True  # type: ignore[assignment]


def compile_pipeline(
    pipeline: Any, *, mode: str = "default", vae: bool = True, backend: str | Callable[..., Any] = "inductor"
) -> list[str]:
    """Compile the transformer (and the VAE decoder); returns what was compiled."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    compile_forward(pipeline.transformer, TRANSFORMER_DYNAMIC, mode=mode, backend=backend)
    compiled = ["transformer"]
    if vae:
        compile_forward(pipeline.vae.decoder, VAE_DECODER_DYNAMIC, mode=mode, backend=backend)
        compiled.append("vae.decoder")
    return compiled


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (grows by one on every compile or recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warm_up_presets(
    pipeline: Any, *, sizes: list[tuple[int, int]] | None = None, max_sequence_length: int = 256
) -> dict[str, Any]:
    """Run every aspect-ratio preset once (2 steps, guided, one image), then one guided call with two
    images and one unguided call with one image: every graph the request shapes need is compiled before
    the first job. Returns seconds and the graphs compiled."""
    import time

    from schemas.sizes import ASPECT_RATIO_SIZES

    presets = sizes if sizes is not None else list(ASPECT_RATIO_SIZES.values())
    width, height = presets[0]
    calls: list[tuple[int, int, int, float]] = [(w, h, 1, 4.5) for w, h in presets]
    calls += [(width, height, 2, 4.5), (width, height, 1, 1.0)]
    before = compiled_graphs()
    started = time.perf_counter()
    per_call = []
    for w, h, images, guidance in calls:
        call_started = time.perf_counter()
        with torch.inference_mode():
            pipeline(
                prompt="warm-up",
                width=w,
                height=h,
                num_inference_steps=WARMUP_STEPS,
                guidance_scale=guidance,
                num_images_per_prompt=images,
                max_sequence_length=max_sequence_length,
                generator=[torch.Generator("cpu").manual_seed(i) for i in range(images)],
                output_type="pil",
            )
        per_call.append(
            {
                "size": f"{w}x{h}",
                "images": images,
                "guidance": guidance,
                "s": round(time.perf_counter() - call_started, 3),
            }
        )
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "graphs_compiled": compiled_graphs() - before,
        "calls": per_call,
    }


# --- all of it, from settings ------------------------------------------------------------------------------


def apply_optimizations(
    pipeline: Any,
    settings: Settings,
    device: torch.device,
    *,
    compile_backend: str | Callable[..., Any] = "inductor",
) -> dict[str, Any]:
    """Apply every switched-on optimisation to ``pipeline`` (in place); returns what was done, for the log
    and the benchmarks."""
    cuda = device.type == "cuda"
    applied: dict[str, Any] = {}
    if cuda:
        set_tf32(settings.tf32)
        applied["tf32"] = settings.tf32
        applied["sdpa_backends"] = restrict_sdpa(settings.sdpa_backends)
    applied["attention"] = ensure_sdpa(pipeline)
    if switch_on(settings.fuse_qkv, device):
        # With LoRAs configured (DARKROOM_LORAS) the transformer stays unfused and uncompiled: see
        # worker/loras.py. Settings refuses forcing either on alongside; 'auto' gives way here.
        # NF4 (DARKROOM_QUANTIZE) stores the transformer's weights packed in 4-bit blocks, which cannot be
        # concatenated: its transformer stays unfused too (Settings refuses FUSE_QKV=true with it).
        applied["fused_qkv"] = fuse_qkv(
            pipeline, transformer_too=not settings.loras and settings.quantize == "none"
        )
    if switch_on(settings.channels_last_vae, device):
        vae_channels_last(pipeline)
        applied["channels_last_vae"] = True
    if settings.quantize != "none":
        applied["quantize"] = settings.quantize + ("+t5" if settings.quantize_t5 else "")
    if settings.fp8:
        quantize_fp8(pipeline.transformer, settings.fp8_recipe, device)
        applied["fp8"] = settings.fp8_recipe
    if switch_on(settings.compile, device) and not settings.loras:
        applied["compile_cache_dir"] = str(configure_compile_cache(settings.compile_cache_dir))
        applied["compiled"] = compile_pipeline(
            pipeline, mode=settings.compile_mode, vae=settings.compile_vae, backend=compile_backend
        )
        if settings.compile_warmup:
            applied["compile_warmup"] = warm_up_presets(pipeline)
    return applied
