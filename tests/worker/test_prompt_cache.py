"""The prompt-embedding cache: LRU semantics, text encoders skipped on a hit, bit-identical images."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from PIL import Image

from schemas.generation import GenerationRequest
from services.settings import Settings
from worker.engine import GenerationEngine
from worker.pipeline_loader import LoadedModel
from worker.prompt_cache import PromptEmbeddingCache, prompt_embeddings, with_prompt_embeddings

SMALL = {"width": 512, "height": 512, "num_inference_steps": 2}


class FakePipeline:
    """Counts encode_prompt calls; embeddings encode the text's length so entries are distinguishable."""

    _execution_device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls: list[str] = []

    def encode_prompt(self, *, prompt: str, max_sequence_length: int, **_: Any) -> tuple[Any, ...]:
        self.calls.append(prompt)
        embeds = torch.full((1, 77 + max_sequence_length, 4), float(len(prompt)))
        return embeds, None, torch.full((1, 3), float(len(prompt))), None


def test_settings_size_zero_disables_and_the_model_is_part_of_the_key() -> None:
    assert PromptEmbeddingCache.from_settings(Settings(prompt_cache_size=0)) is None
    cache = PromptEmbeddingCache.from_settings(Settings(prompt_cache_size=3, model="tiny"))
    assert cache is not None and cache.size == 3
    assert cache.key("a", 256).model == "tiny"
    assert cache.key("a", 256) != cache.key("a", 512) != cache.key("b", 512)
    with pytest.raises(ValueError):
        Settings(prompt_cache_size=-1)


def test_least_recently_used_entries_are_evicted_first() -> None:
    pipe, cache = FakePipeline(), PromptEmbeddingCache(2)
    for text in ("a", "bb", "a", "ccc", "a", "bb"):
        cache.get(pipe, cache.key(text, 77))
    # "a" was used again before "ccc" arrived, so "bb" went first; then "bb" came back, pushing "ccc" out.
    assert pipe.calls == ["a", "bb", "ccc", "bb"]
    assert cache.stats() == {"size": 2, "entries": 2, "hits": 2, "misses": 4}


def test_embeddings_are_repeated_per_image_and_never_the_cached_tensors() -> None:
    pipe, cache = FakePipeline(), PromptEmbeddingCache(4)
    kwargs = {
        "prompt": "fox",
        "negative_prompt": None,
        "num_images_per_prompt": 3,
        "guidance_scale": 4.5,
        "max_sequence_length": 77,
        "width": 512,
    }
    out = with_prompt_embeddings(pipe, cache, kwargs)
    assert "prompt" not in out and "negative_prompt" not in out and out["num_images_per_prompt"] == 1
    assert out["prompt_embeds"].shape == (3, 154, 4) and out["pooled_prompt_embeds"].shape == (3, 3)
    assert out["negative_prompt_embeds"].shape == (3, 154, 4)
    assert pipe.calls == ["fox", ""]  # a guided request without a negative prompt uses "" (as diffusers)
    out["prompt_embeds"].add_(1)  # the pipeline may do what it likes with its copy
    assert cache.get(pipe, cache.key("fox", 77))[0].max() == 3
    unguided = with_prompt_embeddings(pipe, cache, {**kwargs, "guidance_scale": 1.0})
    assert "negative_prompt_embeds" not in unguided


@contextmanager
def encoder_calls(pipeline: Any) -> Iterator[list[str]]:
    """Names of the text encoders run while inside."""
    calls: list[str] = []
    handles = [
        getattr(pipeline, name).register_forward_hook(lambda *_, name=name: calls.append(name))
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def prompt_cache(model: LoadedModel, cache: PromptEmbeddingCache | None) -> Iterator[None]:
    previous = model.prompt_cache
    model.prompt_cache = cache
    try:
        yield
    finally:
        model.prompt_cache = previous


def images(engine: GenerationEngine, request: GenerationRequest) -> list[bytes]:
    return [image.data for image in engine.generate(request).images]


def test_a_cache_hit_skips_all_three_text_encoders(tiny_engine: GenerationEngine) -> None:
    model = tiny_engine.model
    request = GenerationRequest(prompt="a red fox", negative_prompt="blurry", seed=1, **SMALL)
    with prompt_cache(model, PromptEmbeddingCache(8, model.model)):
        with encoder_calls(model.pipeline) as first:
            tiny_engine.generate(request)
        with encoder_calls(model.pipeline) as again:
            tiny_engine.generate(request.model_copy(update={"seed": 2}))
        with encoder_calls(model.pipeline) as new_prompt_same_negative:
            tiny_engine.generate(request.model_copy(update={"prompt": "a grey wolf"}))
    assert sorted(first) == sorted(["text_encoder", "text_encoder_2", "text_encoder_3"] * 2)
    assert again == []
    assert sorted(new_prompt_same_negative) == ["text_encoder", "text_encoder_2", "text_encoder_3"]


def _init_image() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (512, 512), (200, 40, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    "fields",
    [
        {"negative_prompt": "blurry, low quality", "num_images": 2},
        {"guidance_scale": 1.0},
        {"init_image": "INIT", "strength": 0.7},
    ],
    ids=["negative-2-images", "unguided", "img2img"],
)
def test_images_are_bit_identical_with_and_without_the_cache(
    tiny_engine: GenerationEngine, fields: dict[str, Any]
) -> None:
    if fields.get("init_image") == "INIT":
        fields = {**fields, "init_image": _init_image()}
    request = GenerationRequest(prompt="a lighthouse at dusk", seed=11, **{**SMALL, **fields})
    model = tiny_engine.model
    with prompt_cache(model, None):
        reference = images(tiny_engine, request)
    with prompt_cache(model, PromptEmbeddingCache(8, model.model)):
        missed = images(tiny_engine, request)
        hit = images(tiny_engine, request)
    assert reference == missed == hit


def test_the_uncached_path_is_what_encode_prompt_gives(tiny_loaded_model: LoadedModel) -> None:
    pipe = tiny_loaded_model.pipeline
    options = {
        "prompt": "x",
        "negative_prompt": "y",
        "num_images": 2,
        "guided": True,
        "max_sequence_length": 77,
    }
    plain = prompt_embeddings(pipe, None, **options)  # type: ignore[arg-type]
    cached = prompt_embeddings(pipe, PromptEmbeddingCache(4), **options)  # type: ignore[arg-type]
    for a, b in zip(plain, cached, strict=True):
        assert torch.equal(a, b)
