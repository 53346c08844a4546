"""SD3.5-Medium's architecture with random weights, built directly on the device, and its FLOP count.

The GPU benchmark needs the real model's *compute*, not its weights: every shape below is SD3.5-Medium's
(``transformer/config.json``, ``vae/config.json``, ``text_encoder{,_2,_3}/config.json`` on the hub), so a
denoising step costs what the real one costs. Weights are random (no download, no licence gate); modules are
constructed under ``torch.device(device)`` with the default dtype set to bf16, so 8 billion parameters are
allocated and initialised on the GPU in seconds instead of on the CPU in minutes. ``device="meta"`` builds
the same modules without memory, which is how the CPU tests check these configurations.

Tokenizers are the offline tiny model's (character-level CLIP BPE, ASCII T5 unigram): the pipeline pads
CLIP to 77 tokens and T5 to ``max_sequence_length`` whatever the tokenizer, so sequence lengths, and with
them the cost, are the real model's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

# --- SD3.5-Medium's configurations ---------------------------------------------------------------------

TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "vocab_size": 49408,
}
CLIP_G: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "vocab_size": 49408,
}
T5_XXL: dict[str, Any] = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "vocab_size": 32128,
    "tie_word_embeddings": False,
}
CLIP_TOKENS = 77
VAE_SCALE = 8

# Published parameter counts (millions), to check the configurations above build the real model.
EXPECTED_PARAMS_M = {
    "transformer": 2470,
    "text_encoder_3": 4760,
    "text_encoder_2": 695,
    "text_encoder": 124,
    "vae": 84,
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_components(device: str | torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The five SD3.5-M networks with random weights, allocated on ``device`` (``meta``: shapes only)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from worker.tiny_model import _clip_tokenizer, _t5_tokenizer

    clip_tokenizer, t5_tokenizer = _clip_tokenizer(CLIP_TOKENS), _t5_tokenizer()

    def clip(config: dict[str, Any]) -> Any:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                **config,
                max_position_embeddings=CLIP_TOKENS,
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        )

    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        components = {
            "transformer": SD3Transformer2DModel(**TRANSFORMER),
            "vae": AutoencoderKL(**VAE),
            "text_encoder": clip(CLIP_L),
            "text_encoder_2": clip(CLIP_G),
            "text_encoder_3": T5EncoderModel(
                T5Config(
                    **T5_XXL, pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id
                )
            ),
        }
    for module in components.values():
        # Some buffers are computed on the CPU whatever the default device (the transformer's positional
        # embedding table comes from numpy): move everything explicitly.
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    components.update(
        tokenizer=clip_tokenizer, tokenizer_2=_clip_tokenizer(CLIP_TOKENS), tokenizer_3=t5_tokenizer
    )
    return components


def build_full_pipeline(device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> Any:
    """A ``StableDiffusion3Pipeline`` with SD3.5-Medium's full-size architecture and random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from worker.tiny_model import SD35_MEDIUM_SCHEDULER_CONFIG

    components = build_components(device, dtype)
    pipe: Any = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SD35_MEDIUM_SCHEDULER_CONFIG), **components
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts_m(components: dict[str, Any]) -> dict[str, float]:
    """Millions of weights per network, parameters plus saved buffers (the transformer's positional
    embedding table, 384 x 384 x 1536, is a buffer that the checkpoint stores)."""
    counts = {}
    for name, module in components.items():
        if isinstance(module, torch.nn.Module):
            total = sum(p.numel() for p in module.parameters())
            total += sum(b.numel() for b in module.buffers())
            counts[name] = round(total / 1e6, 1)
    return counts


# --- FLOPs ---------------------------------------------------------------------------------------------


def transformer_flops(
    config: Any,
    height: int,
    width: int,
    text_tokens: int,
    batch: int = 1,
    skip_layers: Sequence[int] = (),
    attention: bool = True,
) -> int:
    """Multiply-add FLOPs (2 per MAC) of one ``SD3Transformer2DModel`` forward: every matmul, conv and
    attention product; norms, activations and elementwise work are left out (< 1 %)."""

    def get(key: str) -> Any:
        return config[key] if isinstance(config, dict) else getattr(config, key)

    d = int(get("num_attention_heads")) * int(get("attention_head_dim"))
    p = int(get("patch_size"))
    n = (height // VAE_SCALE // p) * (width // VAE_SCALE // p)
    t = text_tokens
    layers = int(get("num_layers"))
    dual = set(get("dual_attention_layers") or ())
    flops = 2 * n * int(get("in_channels")) * p * p * d  # patch embedding
    flops += 2 * t * int(get("joint_attention_dim")) * d  # context embedder
    pooled = int(get("pooled_projection_dim"))
    flops += 2 * (256 * d + d * d + pooled * d + d * d)  # timestep + pooled text embeddings
    for layer in range(layers):
        if layer in skip_layers:
            continue
        last = layer == layers - 1  # context_pre_only: no text output projection or MLP
        flops += 2 * d * (9 if layer in dual else 6) * d  # image adaLN modulation
        flops += 2 * d * (2 if last else 6) * d  # text adaLN modulation
        flops += 2 * n * 12 * d * d  # image: QKV, out, MLP (4x)
        flops += 2 * t * (3 if last else 12) * d * d  # text: QKV (+ out, MLP)
        joint = n + t
        flops += 4 * joint * joint * d * attention  # QK^T and attention x V over image + text tokens
        if layer in dual:
            flops += 2 * n * 4 * d * d + 4 * n * n * d * attention  # second, image-only attention
    flops += 2 * d * 2 * d + 2 * n * d * p * p * int(get("out_channels"))  # final norm + projection
    return flops * batch


def image_flops(
    config: Any,
    size: int,
    steps: int,
    cfg: bool,
    text_tokens: int,
    slg_layers: Sequence[int] = (),
    slg_start: float = 0.01,
    slg_stop: float = 0.2,
) -> int:
    """Transformer FLOPs to make one ``size``x``size`` image: every step (twice with CFG), plus the extra
    skip-layer-guidance forward in diffusers' SLG window (steps ``start*N < i < stop*N``)."""
    per_step = transformer_flops(config, size, size, text_tokens, batch=2 if cfg else 1)
    total = steps * per_step
    if slg_layers:
        slg_steps = sum(1 for i in range(steps) if steps * slg_start < i < steps * slg_stop)
        total += slg_steps * transformer_flops(config, size, size, text_tokens, skip_layers=slg_layers)
    return total
