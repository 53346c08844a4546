"""All configuration, read once from ``DARKROOM_*`` environment variables.

One typed class for both processes, so a typo'd or out-of-range value fails at start-up with the variable's
name rather than deep inside a job. Read it through :func:`get_settings` (cached); tests build their own
``Settings(...)`` or clear the cache.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
TINY_MODEL = "tiny"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DARKROOM_", extra="ignore", protected_namespaces=())

    # --- the model and how it sits on the device ---------------------------------------------------------
    model: str = Field(
        DEFAULT_MODEL,
        description="Hub id, a local folder in diffusers layout, or 'tiny' (offline random test model).",
    )
    device: str = Field("auto", description="'auto' (CUDA if present, else CPU), or a torch device string.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="'auto': bfloat16 on CUDA, float32 on CPU."
    )
    cpu_offload: bool = Field(False, description="Model CPU offload: smaller GPUs, slower steps.")
    drop_t5: bool = Field(False, description="Load without the T5 encoder (~9 GB less); CLIP-only prompts.")
    warmup: bool = Field(True, description="Run one small generation at load so the first job is not slow.")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
