"""A small LRU of text-encoder outputs, so repeated prompts and negative prompts skip CLIP-L, CLIP-G and T5.

Each *text* is cached on its own (a prompt, or a negative prompt: the empty negative prompt that every
guided request without one uses is the most repeated text of all), keyed by everything that shapes its
embedding: model, the three encoders' texts, ``max_sequence_length`` and ``clip_skip``. An entry is what
``encode_prompt`` gives for that one text with one image per prompt; a request's embeddings are entries
repeated per image, exactly as the pipeline repeats them, so images are bit-identical with the cache on or
off (``tests/worker/test_prompt_cache.py``).

Entries stay on the device: at ``max_sequence_length=256`` an SD3.5 entry is (77 + 256) x 4096 bf16 values,
about 2.7 MB (5.4 MB at 512), so the default 32 entries cost under 200 MB of GPU memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from services.settings import Settings


@dataclass(frozen=True)
class PromptKey:
    model: str
    prompt: str
    prompt_2: str
    prompt_3: str
    max_sequence_length: int
    clip_skip: int | None = None


Embedding = tuple[torch.Tensor, torch.Tensor]  # (sequence embeddings, pooled embeddings), batch 1


def encode_text(pipeline: Any, key: PromptKey) -> Embedding:
    """What ``encode_prompt`` computes for one text, one image, without its negative counterpart."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=key.prompt,
            prompt_2=key.prompt_2,
            prompt_3=key.prompt_3,
            device=pipeline._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=key.clip_skip,
            max_sequence_length=key.max_sequence_length,
        )
    return embeds, pooled


class PromptEmbeddingCache:
    """Least-recently-used text embeddings, at most ``size`` of them; thread-safe."""

    def __init__(self, size: int, model: str = "") -> None:
        if size < 1:
            raise ValueError("a prompt cache needs room for at least one entry (0 means no cache)")
        self.size = size
        self.model = model
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[PromptKey, Embedding] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> PromptEmbeddingCache | None:
        if settings.prompt_cache_size == 0:
            return None
        return cls(settings.prompt_cache_size, settings.model)

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, text: str, max_sequence_length: int, clip_skip: int | None = None) -> PromptKey:
        return PromptKey(self.model, text, text, text, max_sequence_length, clip_skip)

    def get(self, pipeline: Any, key: PromptKey) -> Embedding:
        """The cached embedding of ``key``, encoding (and keeping) it on a miss."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        embedding = encode_text(pipeline, key)  # outside the lock: encoders are the slow part
        with self._lock:
            self._entries[key] = embedding
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return embedding

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict[str, int]:
        return {"size": self.size, "entries": len(self._entries), "hits": self.hits, "misses": self.misses}


def _per_image(embedding: Embedding, num_images: int) -> Embedding:
    """One row per image (a copy, never the cached tensors themselves), as ``encode_prompt`` repeats them."""
    embeds, pooled = embedding
    return embeds.repeat(num_images, 1, 1), pooled.repeat(num_images, 1)


def prompt_embeddings(
    pipeline: Any,
    cache: PromptEmbeddingCache | None,
    *,
    prompt: str,
    negative_prompt: str | None,
    num_images: int,
    guided: bool,
    max_sequence_length: int,
) -> tuple[Any, Any, Any, Any]:
    """(prompt, negative, pooled, negative pooled) embeddings with ``num_images`` rows each — what the
    pipeline computes inside a call of its own; the negative pair is None without guidance. Through
    ``cache`` when there is one, else straight from ``encode_prompt``."""
    if cache is None:
        with torch.no_grad():
            return pipeline.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                prompt_3=None,
                negative_prompt=negative_prompt,
                device=pipeline._execution_device,
                num_images_per_prompt=num_images,
                do_classifier_free_guidance=guided,
                max_sequence_length=max_sequence_length,
            )
    embeds, pooled = _per_image(cache.get(pipeline, cache.key(prompt, max_sequence_length)), num_images)
    if not guided:
        return embeds, None, pooled, None
    # The pipeline encodes a missing negative prompt as "" (and negatives always without clip_skip).
    negative = cache.get(pipeline, cache.key(negative_prompt or "", max_sequence_length))
    negative_embeds, negative_pooled = _per_image(negative, num_images)
    return embeds, negative_embeds, pooled, negative_pooled


def with_prompt_embeddings(
    pipeline: Any, cache: PromptEmbeddingCache, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``kwargs`` for one pipeline call (``GenerationRequest.to_pipeline_kwargs()``) with the prompt texts
    replaced by cached embeddings, one row per image (so ``num_images_per_prompt`` becomes 1)."""
    out = dict(kwargs)
    prompt = out.pop("prompt")
    negative_prompt = out.pop("negative_prompt", None)
    num_images = int(out.pop("num_images_per_prompt", 1) or 1)
    embeds, negative_embeds, pooled, negative_pooled = prompt_embeddings(
        pipeline,
        cache,
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_images=num_images,
        guided=float(out.get("guidance_scale", 7.0)) > 1,
        max_sequence_length=int(out.get("max_sequence_length", 256)),
    )
    out.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_images_per_prompt=1)
    if negative_embeds is not None:
        out.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
    return out
