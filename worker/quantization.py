"""Small-GPU mode: the SD3 transformer (and optionally the T5 encoder) loaded in 4-bit NF4 (bitsandbytes).

``DARKROOM_QUANTIZE=nf4`` loads the transformer through diffusers' own quantisation config, the way the
SD3.5-Medium model card does::

    SD3Transformer2DModel.from_pretrained(model, subfolder="transformer", quantization_config=
        diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.bfloat16))

and ``DARKROOM_QUANTIZE_T5=true`` does the same for ``text_encoder_3`` with transformers' config. The
quantised modules are handed to the one ``StableDiffusion3Pipeline.from_pretrained`` call of
:mod:`worker.pipeline_loader`, so CLIP, the VAE and the scheduler load as they always do. The compute
dtype is the pipeline's (``DARKROOM_DTYPE``: bf16 on CUDA by default, fp16 where a card has no bf16).

Where it cannot run it refuses at start-up, before any weights are read, with every reason at once (no
CUDA device, bitsandbytes not installed): never a silent fall-back to bf16. The refusal is a
:class:`~worker.errors.ModelUnavailableError`, so ``python -m worker`` exits 3 as for any model that
cannot load.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

import torch

from services.settings import Settings
from worker.errors import ModelUnavailableError

#: The oldest bitsandbytes the ``nf4`` extra allows (diffusers itself needs 0.43.3 for 4-bit).
MIN_BITSANDBYTES = (0, 45)
INSTALL_HINT = "pip install -e '.[worker,nf4]' (or pip install 'darkroom[worker,nf4]')"


class QuantizationUnavailable(ModelUnavailableError):
    """``DARKROOM_QUANTIZE=nf4`` was asked for where it cannot run (no CUDA, bitsandbytes missing)."""


def quantized_components(settings: Settings) -> tuple[str, ...]:
    """The pipeline components ``settings`` asks to load in 4-bit (empty when quantisation is off)."""
    if settings.quantize != "nf4":
        return ()
    return ("transformer", "text_encoder_3") if settings.quantize_t5 else ("transformer",)


def nf4_recipe(compute_dtype: torch.dtype) -> dict[str, Any]:
    """The keyword arguments of both libraries' ``BitsAndBytesConfig`` for NF4 weights: 4-bit NormalFloat
    storage, matmuls in ``compute_dtype`` (the model card's recipe: no double quantisation)."""
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute_dtype}


def _bitsandbytes_version() -> tuple[int, ...] | None:
    """The installed bitsandbytes' version, or None when it cannot be imported (not installed, or hidden)."""
    try:
        if importlib.util.find_spec("bitsandbytes") is None:
            return None
        text = importlib.metadata.version("bitsandbytes")
    except (ValueError, importlib.metadata.PackageNotFoundError):  # ValueError: hidden via sys.modules
        return None
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def nf4_problems(device: torch.device) -> list[str]:
    """Why NF4 cannot run on ``device`` in this environment (empty: it can). Checks only what is known
    before loading: a CUDA device and an installed bitsandbytes; the library's own errors follow later."""
    problems = []
    if device.type != "cuda" or not torch.cuda.is_available():
        problems.append(
            f"it needs a CUDA GPU (bitsandbytes 4-bit kernels), and this worker runs on {device}"
            + ("" if torch.cuda.is_available() else " with no CUDA device visible")
        )
    version = _bitsandbytes_version()
    if version is None:
        problems.append(f"bitsandbytes is not installed: {INSTALL_HINT}")
    elif version < MIN_BITSANDBYTES:
        found = ".".join(map(str, version))
        wanted = ".".join(map(str, MIN_BITSANDBYTES))
        problems.append(f"bitsandbytes {found} is too old (>= {wanted} needed): {INSTALL_HINT}")
    return problems


def require_nf4(settings: Settings, device: torch.device) -> None:
    """Refuse clearly, naming the setting, when ``DARKROOM_QUANTIZE=nf4`` cannot run here."""
    if settings.quantize != "nf4":
        return
    problems = nf4_problems(device)
    if problems:
        raise QuantizationUnavailable(
            "DARKROOM_QUANTIZE=nf4 cannot run here: "
            + "; ".join(problems)
            + ". Unset DARKROOM_QUANTIZE (or set it to 'none') to load the model unquantised."
        )


def quantization_configs(settings: Settings, compute_dtype: torch.dtype) -> dict[str, Any]:
    """Per component, the ``quantization_config`` its ``from_pretrained`` gets: diffusers' config for the
    transformer, transformers' for the T5 encoder. Needs bitsandbytes installed (both libraries check)."""
    components = quantized_components(settings)
    if not components:
        return {}
    if _bitsandbytes_version() is None:
        raise QuantizationUnavailable(
            f"DARKROOM_QUANTIZE=nf4 cannot run here: bitsandbytes is not installed: {INSTALL_HINT}"
        )
    import diffusers
    import transformers

    recipe = nf4_recipe(compute_dtype)
    configs: dict[str, Any] = {"transformer": diffusers.BitsAndBytesConfig(**recipe)}
    if "text_encoder_3" in components:
        configs["text_encoder_3"] = transformers.BitsAndBytesConfig(**recipe)
    return configs


def load_quantized(
    location: str, settings: Settings, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Load the components ``settings`` quantises, ready to pass on to the pipeline's ``from_pretrained``
    as keyword arguments (``transformer=``, ``text_encoder_3=``). Refuses first where NF4 cannot run."""
    require_nf4(settings, device)
    configs = quantization_configs(settings, dtype)
    if not configs:
        return {}
    if device.type == "cuda" and device.index is not None:
        # bitsandbytes places 4-bit weights on the *current* CUDA device (diffusers' and transformers'
        # default device_map): make that the configured one.
        torch.cuda.set_device(device)
    from diffusers import SD3Transformer2DModel
    from transformers import T5EncoderModel

    loaded: dict[str, Any] = {
        "transformer": SD3Transformer2DModel.from_pretrained(
            location, subfolder="transformer", quantization_config=configs["transformer"], dtype=dtype
        )
    }
    if "text_encoder_3" in configs:
        loaded["text_encoder_3"] = T5EncoderModel.from_pretrained(
            location, subfolder="text_encoder_3", quantization_config=configs["text_encoder_3"], dtype=dtype
        )
    return loaded
