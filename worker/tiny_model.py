"""The offline tiny model: a randomly initialised SD3 pipeline with SD3.5-Medium's *geometry*.

Real SD3.5 weights can never be downloaded on CI, yet the loading code must be the real one. So we build a
pipeline whose shapes follow the real model where it matters to the serving code — VAE with 8x downsampling
and 16 latent channels, transformer patch size 2 with dual attention in the first layers and qk RMS-norm, two
CLIP text encoders with projection plus a T5 encoder, CLIP tokenizers with ``model_max_length == 77``,
the real scheduler config — but only a few MB of weights. It is written once with ``save_pretrained``
into a cache folder and then loaded through exactly the ``from_pretrained`` path that loads the real model.

Images from it are noise; that is the point: everything around the weights is real.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

# Bump when the recipe below changes, so stale caches are rebuilt instead of silently reused.
TINY_MODEL_VERSION = 1
TINY_MODEL_SEED = 20241022  # SD3.5-Medium's release date; any fixed value works.

# SD3.5-Medium's scheduler config (scheduler/scheduler_config.json on the hub).
SD35_MEDIUM_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

CLIP_MAX_LENGTH = 77
_CLIP_L_HIDDEN, _CLIP_G_HIDDEN = 16, 32
_T5_HIDDEN = 64  # joint_attention_dim: must be >= the concatenated CLIP hidden sizes (16 + 32)
_NUM_LAYERS = 10  # enough for SD3.5-M's skip-layer-guidance layers [7, 8, 9] to exist
_DUAL_ATTENTION_LAYERS = tuple(range(5))  # SD3.5-M: the first ~half of its layers (0..12 of 24)


def default_cache_dir() -> Path:
    """Where the tiny model lives: next to Hugging Face's own cache, so it is shared across checkouts."""
    base = os.environ.get("DARKROOM_TINY_MODEL_DIR")
    if base:
        return Path(base)
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return hf_home / "darkroom" / f"tiny-sd3-v{TINY_MODEL_VERSION}"


def _clip_tokenizer(max_length: int) -> Any:
    """A byte-level BPE CLIP tokenizer with no merges: every character is a token.

    Built from the same byte-to-unicode table CLIP uses, so any prompt (emoji included) tokenizes; with no
    merges, token counts are character counts, which makes truncation easy to exercise in tests.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(symbol, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer() -> Any:
    """A unigram T5 tokenizer over printable ASCII, each piece with and without the word-start marker."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    for code in range(32, 127):
        ch = chr(code)
        pieces += [("\u2581" + ch, -2.0), (ch, -3.0)]
    pieces.append(("\u2581", -4.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_pipeline() -> Any:
    """Build the randomly initialised pipeline in memory (deterministic: fixed seed, CPU, fp32)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(TINY_MODEL_SEED)
    clip_tokenizer = _clip_tokenizer(CLIP_MAX_LENGTH)
    t5_tokenizer = _t5_tokenizer()

    def clip_encoder(hidden: int) -> Any:
        config = CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            projection_dim=hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
            hidden_act="gelu",
        )
        return CLIPTextModelWithProjection(config)

    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=_T5_HIDDEN,
            d_kv=16,
            d_ff=_T5_HIDDEN * 2,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=_NUM_LAYERS,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_HIDDEN,
        caption_projection_dim=32,
        pooled_projection_dim=_CLIP_L_HIDDEN + _CLIP_G_HIDDEN,
        pos_embed_max_size=128,  # 128 patches * 2 * 8 = 2048 px, the API's largest side
        dual_attention_layers=_DUAL_ATTENTION_LAYERS,
        qk_norm="rms_norm",
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),  # four blocks: 2**3 = 8x downsampling, as SD3.5-M
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.5305,  # SD3.5-M's VAE scaling and shift factors
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,  # full attention over 128x128 latents costs seconds on CPU
    )
    pipe: Any = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD35_MEDIUM_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=clip_encoder(_CLIP_L_HIDDEN),
        tokenizer=clip_tokenizer,
        text_encoder_2=clip_encoder(_CLIP_G_HIDDEN),
        tokenizer_2=_clip_tokenizer(CLIP_MAX_LENGTH),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return a folder holding the tiny model in ``save_pretrained`` layout, building it on first use.

    The folder is written under a temporary name and renamed into place, so concurrent workers (or a crash
    half-way) never leave a partial model that a later ``from_pretrained`` would trip over.
    """
    target = cache_dir or default_cache_dir()
    marker = target / "darkroom_tiny_model.json"
    if marker.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    staging = Path(tempfile.mkdtemp(prefix=".tiny-sd3-", dir=target.parent))
    try:
        build_tiny_pipeline().save_pretrained(staging, safe_serialization=True)
        (staging / "darkroom_tiny_model.json").write_text(
            json.dumps({"version": TINY_MODEL_VERSION, "seed": TINY_MODEL_SEED, "weights": "random"})
        )
        try:
            staging.rename(target)
        except OSError:
            if not marker.is_file():  # someone else won the race only if their marker is there
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def save_tiny_lora(folder: Path, seed: int, *, model_dir: Path | None = None, rank: int = 4) -> Path:
    """Write a random LoRA for the tiny model's transformer (attention q/k/v/out) into ``folder``, in the
    layout ``StableDiffusion3Pipeline.save_lora_weights`` gives any trained SD3 LoRA; returns the file.

    Both low-rank factors are random (a freshly initialised LoRA has B = 0 and changes nothing), so the
    adapter visibly changes the tiny model's output — what the LoRA tests assert. Deterministic in ``seed``.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer: Any = SD3Transformer2DModel.from_pretrained(
        ensure_tiny_model(model_dir), subfolder="transformer"
    )
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
        with torch.no_grad():
            for name, parameter in transformer.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.5)
    layers = get_peft_model_state_dict(transformer)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"
