"""Coalescing in the engine: ``generate_group`` gives each request what it would get alone.

Small on purpose (512x512, 2-3 steps): the tiny model's cost is the transformer, per latent row and step.
Pixels are compared on PNGs (max abs difference <= 2, the engine's tolerance); a lossy format amplifies
the same sub-level differences through its encoder, so there the bound is looser.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.generation import GenerationRequest
from worker.engine import GenerationEngine, GenerationResult, coalesce_key
from worker.errors import GenerationCanceled

BASE: dict[str, Any] = {"width": 512, "height": 512, "num_inference_steps": 2}
LOSSY_BOUND = 24


def request(prompt: str, seed: int, **fields: Any) -> GenerationRequest:
    return GenerationRequest(**{"prompt": prompt, "seed": seed, **BASE, **fields})


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_as_alone(engine: GenerationEngine, outcome: Any, alone_request: GenerationRequest) -> None:
    assert isinstance(outcome, GenerationResult), outcome
    alone = engine.generate(alone_request)
    assert [image.seed for image in outcome.images] == [image.seed for image in alone.images]
    for coalesced, single in zip(outcome.images, alone.images, strict=True):
        assert (coalesced.content_type, coalesced.width, coalesced.height) == (
            single.content_type,
            single.width,
            single.height,
        )
        difference = int(np.abs(pixels(coalesced.data) - pixels(single.data)).max())
        bound = 2 if coalesced.content_type == "image/png" else LOSSY_BOUND
        assert difference <= bound, f"seed {coalesced.seed}: max abs pixel difference {difference}"


class RowCounter:
    """Latent rows each transformer forward saw (CFG doubles them)."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.rows: list[int] = []
        transformer = engine.model.pipeline.transformer
        self._handle = transformer.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: Any, kwargs: Any) -> None:
        self.rows.append(int(kwargs["hidden_states"].shape[0]))

    def __enter__(self) -> RowCounter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def test_coalesce_key_groups_what_can_share_a_call_and_nothing_else() -> None:
    key = coalesce_key(request("a fox", 1).normalized())
    same = [
        request("another prompt", 99, num_images=3, output_format="jpeg", negative_prompt="blur"),
        request("a fox", 1, output_format="webp", output_quality=50),
    ]
    for other in same:
        assert coalesce_key(other.normalized()) == key
    different = [
        request("a fox", 1, width=768),
        request("a fox", 1, num_inference_steps=3),
        request("a fox", 1, guidance_scale=7.0),
        request("a fox", 1, skip_layer_guidance=True),
        request("a fox", 1, max_sequence_length=77),
    ]
    for other in different:
        assert coalesce_key(other.normalized()) != key
    assert coalesce_key(request("a fox", 1, skip_layer_guidance={"scale": 3.0})) != coalesce_key(
        request("a fox", 1, skip_layer_guidance=True)
    )


def test_image_to_image_never_coalesces_and_mixed_keys_are_refused(tiny_engine: GenerationEngine) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (512, 512), (200, 40, 40)).save(buffer, format="PNG")
    img2img = request("x", 1, init_image=base64.b64encode(buffer.getvalue()).decode(), strength=0.5)
    assert coalesce_key(img2img) is None
    with pytest.raises(ValueError, match="coalesce_key"):
        tiny_engine.generate_group([request("x", 1), img2img])
    with pytest.raises(ValueError, match="coalesce_key"):
        tiny_engine.generate_group([request("x", 1), request("x", 1, num_inference_steps=3)])
    with pytest.raises(ValueError, match="at least one"):
        tiny_engine.generate_group([])


def test_a_group_of_one_is_a_request_run_alone_of_any_kind(tiny_engine: GenerationEngine) -> None:
    """N = 1 is the worker's only path for a job run alone: any request (image-to-image included), byte
    for byte what ``generate`` makes, with its own callbacks and no ``coalesced`` timing."""
    buffer = io.BytesIO()
    Image.new("RGB", (512, 512), (200, 40, 40)).save(buffer, format="PNG")
    init_image = base64.b64encode(buffer.getvalue()).decode()
    for alone in (request("a fox", 1), request("a fox", 1, init_image=init_image, strength=0.5)):
        progress: list[int] = []
        [outcome] = tiny_engine.generate_group(
            [alone], on_progress=[lambda s, t, seen=progress: seen.append(s)]
        )
        assert isinstance(outcome, GenerationResult), outcome
        assert progress == list(range(1, len(progress) + 1)) and progress
        assert "coalesced" not in outcome.timings
        assert [i.data for i in outcome.images] == [i.data for i in tiny_engine.generate(alone).images]
    canceled: list[str] = []
    [outcome] = tiny_engine.generate_group(
        [request("a fox", 1)], should_cancel=[lambda: True], on_canceled=[lambda e: canceled.append(str(e))]
    )
    assert isinstance(outcome, GenerationCanceled)
    assert canceled == ["canceled before the first denoising step"]


def test_each_request_of_a_group_gets_exactly_what_it_would_alone(tiny_engine: GenerationEngine) -> None:
    requests = [
        request("a lighthouse at dusk", 2**32 - 1, num_images=2, negative_prompt="blurry"),
        request("a bowl of ramen", 5, output_format="webp", output_quality=100),
    ]
    progress: list[list[tuple[int, int]]] = [[], []]
    with RowCounter(tiny_engine) as counter:
        outcomes = tiny_engine.generate_group(
            requests,
            on_progress=[lambda s, t, seen=seen: seen.append((s, t)) for seen in progress],  # type: ignore[misc]
        )
    assert counter.rows == [6, 6]  # one CFG-doubled forward of all 3 images per step
    assert progress == [[(1, 2), (2, 2)]] * 2
    assert [image.seed for image in outcomes[0].images] == [2**32 - 1, 0]  # type: ignore[union-attr]
    assert outcomes[1].images[0].content_type == "image/webp"  # type: ignore[union-attr]
    for outcome, alone in zip(outcomes, requests, strict=True):
        assert isinstance(outcome, GenerationResult)
        assert outcome.timings["coalesced"] == 2
        assert outcome.token_counts["prompt"]["t5_limit"] == 256
        assert_same_as_alone(tiny_engine, outcome, alone)


def test_a_request_canceled_mid_call_leaves_and_the_others_carry_on(tiny_engine: GenerationEngine) -> None:
    steps = {"num_inference_steps": 3}
    requests = [request("a fox", 1, **steps), request("a cat", 2, num_images=2, **steps)]
    progress: list[list[int]] = [[], []]
    canceled: list[tuple[int, str]] = []
    with RowCounter(tiny_engine) as counter:
        outcomes = tiny_engine.generate_group(
            requests,
            on_progress=[lambda s, t, seen=seen: seen.append(s) for seen in progress],  # type: ignore[misc]
            should_cancel=[lambda: len(progress[0]) >= 1, None],
            on_canceled=[lambda error: canceled.append((len(progress[1]), str(error))), None],
        )
    assert counter.rows == [6, 4, 4]  # its row (in the latents and both CFG halves) left after step 1
    assert canceled == [(1, "canceled after denoising step 1")]  # reported at once, not after the call
    assert progress == [[1], [1, 2, 3]]
    assert isinstance(outcomes[0], GenerationCanceled)
    assert_same_as_alone(tiny_engine, outcomes[1], requests[1])


def test_under_skip_layer_guidance_a_canceled_requests_rows_ride_along(tiny_engine: GenerationEngine) -> None:
    slg = {"skip_layer_guidance": {"start": 0.0, "stop": 0.9}}
    requests = [request("a fox", 1, **slg), request("a cat", 2, **slg)]
    canceled: list[str] = []
    with RowCounter(tiny_engine) as counter:
        outcomes = tiny_engine.generate_group(
            requests,
            should_cancel=[None, lambda: len(counter.rows) >= 1],
            on_canceled=[None, lambda error: canceled.append(str(error))],
        )
    # CFG forward of both (4 rows) each step, plus the skip-layer forward (2 rows) at step 2.
    assert counter.rows == [4, 4, 2]
    assert canceled == ["canceled after denoising step 1"]
    assert isinstance(outcomes[1], GenerationCanceled)
    assert_same_as_alone(tiny_engine, outcomes[0], requests[0])


def test_cancels_before_and_during_a_coalesced_call(tiny_engine: GenerationEngine) -> None:
    requests = [request("a fox", 1), request("a cat", 2), request("a dog", 3)]
    with RowCounter(tiny_engine) as counter:
        outcomes = tiny_engine.generate_group(
            requests,
            should_cancel=[lambda: True, lambda: len(counter.rows) >= 1, lambda: len(counter.rows) >= 1],
        )
    assert counter.rows == [4]  # the first never started; once the other two canceled, nothing more ran
    assert all(isinstance(outcome, GenerationCanceled) for outcome in outcomes)
    assert str(outcomes[0]) == "canceled before the first denoising step"

    # Only one left after the cancels before the start: it runs as it would alone, byte for byte.
    [canceled, alone] = tiny_engine.generate_group(requests[:2], should_cancel=[lambda: True, None])
    assert isinstance(canceled, GenerationCanceled)
    assert isinstance(alone, GenerationResult)
    assert alone.images[0].data == tiny_engine.generate(requests[1]).images[0].data


def test_out_of_memory_in_a_coalesced_call_runs_the_requests_one_by_one(
    tiny_engine: GenerationEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [request("a fox", 1, guidance_scale=1.0), request("a cat", 2, guidance_scale=1.0)]
    references = [tiny_engine.generate(r).images[0].data for r in requests]
    transformer = tiny_engine.model.pipeline.transformer
    real_forward = transformer.forward
    rows: list[int] = []

    def forward_that_fits_one_row(*args: Any, **kwargs: Any) -> Any:
        rows.append(int(kwargs["hidden_states"].shape[0]))
        if rows[-1] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", forward_that_fits_one_row)
    progress: list[list[int]] = [[], []]
    outcomes = tiny_engine.generate_group(
        requests,
        on_progress=[lambda s, t, seen=seen: seen.append(s) for seen in progress],  # type: ignore[misc]
    )
    assert rows == [2, 1, 1, 1, 1]
    assert progress == [[1, 2], [1, 2]]
    assert [o.images[0].data for o in outcomes] == references  # type: ignore[union-attr]
