"""LoRA adapters on the tiny model: an adapter changes the image, leaves nothing behind for the next job,
is loaded once, and is coalesced only with jobs asking for the same set (worker/loras.py)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from schemas.generation import GenerationRequest
from services.settings import Settings
from worker.engine import GenerationEngine, GenerationResult, coalesce_key
from worker.errors import LoraUnavailable
from worker.loras import LoraAdapters, resolve_source

BASE: dict[str, Any] = {
    "prompt": "a red fox in the snow",
    "width": 512,
    "height": 512,
    "num_inference_steps": 2,
    "guidance_scale": 1.0,  # no CFG: half the transformer work, the same adapter arithmetic
}


def request(seed: int = 3, **fields: Any) -> GenerationRequest:
    return GenerationRequest(**{**BASE, "seed": seed, **fields})


def image(engine: GenerationEngine, **fields: Any) -> bytes:
    [first] = engine.generate(request(**fields)).images
    return first.data


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.int16)


def difference(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread, as the stacks' workers use (tests.fixtures.stack.ONE_THREAD): on a small
    machine shared with other tests, spinning OpenMP threads cost these many small generations several
    times their run time. Bit-exact comparisons here are always between images made under this setting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir: Path, tiny_loras: dict[str, str]) -> GenerationEngine:
    """A second tiny pipeline with the two LoRAs on its allow-list (the session engine stays LoRA-free)."""
    from worker.pipeline_loader import load_pipeline

    return GenerationEngine(load_pipeline(Settings(model="tiny", warmup=False, loras=tiny_loras)))


def adapters(engine: GenerationEngine) -> LoraAdapters:
    assert engine.model.loras is not None
    return engine.model.loras


def test_a_lora_changes_the_image_and_the_next_job_is_a_fresh_pipelines(
    lora_engine: GenerationEngine, tiny_engine: GenerationEngine
) -> None:
    fresh = image(tiny_engine)  # a pipeline that never saw an adapter
    before = image(lora_engine)
    with_ink = image(lora_engine, loras=[{"name": "ink"}])
    after = image(lora_engine)
    assert before == fresh
    assert difference(with_ink, fresh) > 40, "the adapter had no visible effect"
    assert after == fresh, "the previous job's adapter leaked into a job without one"
    assert adapters(lora_engine).active == ()


def test_scale_zero_is_no_adapter_and_the_scale_sets_the_strength(lora_engine: GenerationEngine) -> None:
    plain = image(lora_engine)
    off = image(lora_engine, loras=[{"name": "ink", "scale": 0}])
    half = image(lora_engine, loras=[{"name": "ink", "scale": 0.5}])
    full = image(lora_engine, loras=[{"name": "ink", "scale": 1}])
    assert difference(off, plain) <= 2
    assert difference(half, plain) > 10 and difference(half, full) > 10


def test_each_adapter_loads_once_and_exactly_the_requested_set_applies(lora_engine: GenerationEngine) -> None:
    loads = adapters(lora_engine).loads
    ink = image(lora_engine, loras=[{"name": "ink"}])
    rust = image(lora_engine, loras=[{"name": "rust"}])
    both = image(lora_engine, loras=[{"name": "rust"}, {"name": "ink"}])
    ink_again = image(lora_engine, loras=[{"name": "ink"}])
    assert adapters(lora_engine).loaded == {"ink", "rust"}
    assert adapters(lora_engine).loads - loads <= 2 and adapters(lora_engine).loads == 2
    assert difference(ink, rust) > 10 and difference(both, ink) > 10 and difference(both, rust) > 10
    assert ink_again == ink, "rust, active in the jobs before, leaked into a job asking for ink alone"


def test_the_coalesce_key_separates_adapter_sets_and_ignores_their_order() -> None:
    plain = coalesce_key(request())
    ink = coalesce_key(request(loras=[{"name": "ink"}]))
    assert plain != ink
    assert ink != coalesce_key(request(loras=[{"name": "ink", "scale": 0.5}]))
    assert coalesce_key(request(loras=[{"name": "ink"}, {"name": "rust", "scale": -1}])) == coalesce_key(
        request(seed=9, loras=[{"name": "rust", "scale": -1.0}, {"name": "ink", "scale": 1.0}])
    )
    assert ink is not None and ink.loras == (("ink", 1.0),)


def test_a_group_sharing_an_adapter_gets_what_each_request_gets_alone(lora_engine: GenerationEngine) -> None:
    lora = [{"name": "rust", "scale": 0.8}]
    requests = [request(5, loras=lora, num_images=2), request(11, prompt="a bowl of ramen", loras=lora)]
    outcomes = lora_engine.generate_group(requests)
    for outcome, alone in zip(outcomes, requests, strict=True):
        assert isinstance(outcome, GenerationResult), outcome
        assert outcome.timings["coalesced"] == 2
        single = lora_engine.generate(alone)
        for coalesced, own in zip(outcome.images, single.images, strict=True):
            assert difference(coalesced.data, own.data) <= 2
    assert difference(outcomes[1].images[0].data, image(lora_engine, seed=11, prompt="a bowl of ramen")) > 10  # type: ignore[union-attr]


def test_adapters_off_the_list_or_unreadable_fail_the_job_not_the_worker(
    lora_engine: GenerationEngine, tiny_engine: GenerationEngine, tmp_path: Path
) -> None:
    with pytest.raises(LoraUnavailable, match="'sepia' is not offered"):
        lora_engine.generate(request(loras=[{"name": "sepia"}]))
    with pytest.raises(LoraUnavailable, match="no DARKROOM_LORAS"):
        tiny_engine.generate(request(loras=[{"name": "ink"}]))
    [outcome] = lora_engine.generate_group([request(loras=[{"name": "sepia"}])])
    assert isinstance(outcome, LoraUnavailable)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    engine_adapters = adapters(lora_engine)
    engine_adapters.sources["broken"] = str(broken)
    try:
        with pytest.raises(LoraUnavailable, match="could not be read"):
            lora_engine.generate(request(loras=[{"name": "broken"}]))
        assert image(lora_engine) == image(tiny_engine)  # the failed load left nothing switched on
    finally:
        del engine_adapters.sources["broken"]


def test_sources_are_local_files_folders_or_hub_ids(tmp_path: Path) -> None:
    weights = tmp_path / "style.safetensors"
    weights.write_bytes(b"")
    assert resolve_source(str(weights)) == (str(tmp_path), "style.safetensors")
    assert resolve_source(str(tmp_path)) == (str(tmp_path), None)
    assert resolve_source("owner/sd35-style") == ("owner/sd35-style", "pytorch_lora_weights.safetensors")
    assert resolve_source("owner/repo/loras/v2.safetensors") == ("owner/repo", "loras/v2.safetensors")
    for bad in ("/no/such/file.safetensors", "not a hub id", "./relative"):
        with pytest.raises(LoraUnavailable):
            resolve_source(bad)
