"""LoRA adapters from the operator's allow-list (``DARKROOM_LORAS``), loaded once and switched per job.

A request names adapters with a scale each (``loras: [{name, scale}]``); the API refuses names that are not
on the list, the worker refuses them again (defence in depth). An adapter's weights are read on the first
job that asks for it (``lora_state_dict``: a local ``.safetensors`` file or folder, or a hub id) and stay in
the transformer as a named PEFT adapter; every later job only *activates* a set. Before each pipeline call
the engine calls :meth:`LoraAdapters.activate` with the job's set, which switches on exactly those adapters
at those scales — or switches every adapter layer off for a job without any, so nothing one job asked for
reaches the next (``tests/worker/test_loras.py``: a job without LoRA after one with is bit-identical to a
fresh pipeline's). The set is part of the coalescing key, so a coalesced call shares one set.

Transformer only: text-encoder layers in a LoRA file are not loaded (logged when dropped), so prompt
embeddings — and the prompt-embedding cache keyed on the text alone — do not depend on the adapters.
Adapters wrap the transformer's separate q/k/v/out projections, so with LoRAs configured the transformer is
neither QKV-fused nor compiled (``worker.optimizations``; ``Settings`` refuses forcing either on).
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.errors import LoraUnavailable

log = logging.getLogger(__name__)

AdapterSet = tuple[tuple[str, float], ...]  # sorted (name, scale): GenerationRequest.adapter_set()
#: diffusers' file name for LoRA weights, assumed for a hub repo named without a file (offline mode
#: cannot list a repo's files).
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_HUB_SOURCE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>.+\.safetensors))?$")


def resolve_source(source: str) -> tuple[str, str | None]:
    """(``lora_state_dict`` location, ``weight_name``) for a local file, a local folder or a hub id
    (``owner/repo`` or ``owner/repo/sub/file.safetensors``)."""
    path = Path(source).expanduser()
    if path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    match = _HUB_SOURCE.match(source)
    if source.startswith(("/", ".", "~")) or match is None:
        raise LoraUnavailable(f"LoRA source {source!r} is neither an existing file or folder nor a hub id")
    return match["repo"], match["file"] or DEFAULT_WEIGHT_NAME


class LoraAdapters:
    """The adapters of one pipeline's transformer: which are loaded, which are active. Thread-safe, though
    the engine already calls it under its own lock."""

    def __init__(self, pipeline: Any, sources: Mapping[str, str]) -> None:
        self.pipeline = pipeline
        self.sources = dict(sources)
        self.loads = 0  # adapters read from disk or hub so far (each at most once)
        self._loaded: set[str] = set()
        self._active: AdapterSet | None = ()  # None: unknown (a load failed half-way)
        self._lock = threading.Lock()

    @property
    def loaded(self) -> frozenset[str]:
        return frozenset(self._loaded)

    @property
    def active(self) -> AdapterSet | None:
        return self._active

    def activate(self, adapters: AdapterSet) -> None:
        """Make exactly ``adapters`` (sorted name/scale pairs) apply to the next pipeline call."""
        with self._lock:
            unknown = [name for name, _ in adapters if name not in self.sources]
            if unknown:
                raise LoraUnavailable(
                    f"LoRA {', '.join(map(repr, unknown))} is not offered by this worker (DARKROOM_LORAS)"
                )
            transformer = self.pipeline.transformer
            if not adapters:
                if getattr(transformer, "_hf_peft_config_loaded", False):  # else: no LoRA layers at all
                    transformer.disable_lora()
                self._active = ()
                return
            for name, _ in adapters:
                if name not in self._loaded:
                    self._load(name)
            transformer.enable_lora()
            transformer.set_adapters([name for name, _ in adapters], weights=[scale for _, scale in adapters])
            self._active = adapters

    def _load(self, name: str) -> None:
        source = self.sources[name]
        location, weight_name = resolve_source(source)
        self._active = None
        try:
            state_dict, metadata = self.pipeline.lora_state_dict(
                location, weight_name=weight_name, return_lora_metadata=True
            )
        except (OSError, ValueError) as exc:
            raise LoraUnavailable(
                f"LoRA {name!r} could not be read from {source!r} ({type(exc).__name__}: {exc})"
            ) from exc
        prefix = f"{self.pipeline.transformer_name}."
        dropped = sorted({key.split(".", 1)[0] for key in state_dict if not key.startswith(prefix)})
        state_dict = {key: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not state_dict:
            raise LoraUnavailable(f"LoRA {name!r} ({source}) has no transformer layers to load")
        if dropped:
            log.warning("LoRA %s: layers for %s not loaded (transformer only)", name, ", ".join(dropped))
        try:
            with warnings.catch_warnings():  # PEFT lists the *other* adapters' keys as "missing": noise
                warnings.simplefilter("ignore")
                self.pipeline.load_lora_into_transformer(
                    state_dict,
                    transformer=self.pipeline.transformer,
                    adapter_name=name,
                    metadata=metadata,
                    _pipeline=self.pipeline,
                )
        except (RuntimeError, ValueError, KeyError) as exc:  # shapes or module names of another model
            self._forget(name)
            raise LoraUnavailable(
                f"LoRA {name!r} ({source}) does not fit this model ({type(exc).__name__}: {exc})"
            ) from exc
        self._loaded.add(name)
        self.loads += 1
        log.info("LoRA %s loaded from %s", name, source)

    def _forget(self, name: str) -> None:
        """Best effort: remove what a failed load may have injected, so it cannot apply later."""
        try:
            self.pipeline.transformer.delete_adapters(name)
        except Exception:  # nothing was injected: the load error is what matters
            pass


def activate_adapters(adapters: LoraAdapters | None, wanted: AdapterSet) -> None:
    """:meth:`LoraAdapters.activate`, for a model that may have no allow-list at all."""
    if adapters is not None:
        adapters.activate(wanted)
    elif wanted:
        names = ", ".join(repr(name) for name, _ in wanted)
        raise LoraUnavailable(f"LoRA {names} requested, but this worker has no DARKROOM_LORAS")
