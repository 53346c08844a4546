"""The engine on the tiny model: reproducible seeds, batches, presets, image-to-image, cancel, OOM."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.generation import GenerationRequest
from schemas.sizes import ASPECT_RATIO_SIZES, AspectRatio
from worker.engine import GenerationEngine
from worker.errors import GenerationCanceled, GenerationOutOfMemory

SMALL = {"width": 512, "height": 512, "num_inference_steps": 4}


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def generate(engine: GenerationEngine, **fields: Any) -> list[bytes]:
    request = GenerationRequest(**{"prompt": "a red fox in the snow", **SMALL, **fields})
    return [image.data for image in engine.generate(request).images]


def test_same_seed_same_bytes_and_different_seed_different_pixels(tiny_engine: GenerationEngine) -> None:
    [first] = generate(tiny_engine, seed=7)
    [again] = generate(tiny_engine, seed=7)
    [other] = generate(tiny_engine, seed=8)
    assert first == again
    assert np.abs(pixels(first) - pixels(other)).max() > 10


def test_image_k_of_a_batch_equals_the_single_image_with_seed_plus_k(tiny_engine: GenerationEngine) -> None:
    batch = generate(tiny_engine, seed=100, num_images=3)
    assert len(batch) == 3
    for k, data in enumerate(batch):
        [alone] = generate(tiny_engine, seed=100 + k)
        assert np.abs(pixels(data) - pixels(alone)).max() <= 2, f"image {k} differs from seed {100 + k} alone"
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).max() > 10


def test_the_result_reports_each_images_seed_size_and_hash(tiny_engine: GenerationEngine) -> None:
    import hashlib

    request = GenerationRequest(prompt="x", seed=2**32 - 1, num_images=2, **SMALL)
    result = tiny_engine.generate(request)
    assert [image.seed for image in result.images] == [2**32 - 1, 0]
    for image in result.images:
        assert (image.width, image.height) == (512, 512)
        assert image.sha256 == hashlib.sha256(image.data).hexdigest()
        assert image.content_type == "image/png"


@pytest.mark.parametrize("ratio", list(AspectRatio))
def test_every_aspect_ratio_preset_generates_exactly_its_size(
    tiny_engine: GenerationEngine, ratio: AspectRatio
) -> None:
    request = GenerationRequest(prompt="x", aspect_ratio=ratio, num_inference_steps=1, seed=1)
    [image] = tiny_engine.generate(request).images
    with Image.open(io.BytesIO(image.data)) as decoded:
        assert decoded.size == ASPECT_RATIO_SIZES[ratio]
    assert (image.width, image.height) == ASPECT_RATIO_SIZES[ratio]


def test_negative_prompt_and_guidance_and_slg_all_change_the_image(tiny_engine: GenerationEngine) -> None:
    base = {"seed": 3, "num_inference_steps": 10}
    [plain] = generate(tiny_engine, **base)
    [negative] = generate(tiny_engine, negative_prompt="blurry, low quality", **base)
    [guided] = generate(tiny_engine, guidance_scale=9.0, **base)
    [slg] = generate(tiny_engine, skip_layer_guidance=True, **base)
    for name, other in (("negative_prompt", negative), ("guidance_scale", guided), ("slg", slg)):
        assert np.abs(pixels(plain) - pixels(other)).max() > 0, f"{name} had no effect"


def test_progress_is_reported_after_every_step(tiny_engine: GenerationEngine) -> None:
    seen: list[tuple[int, int]] = []
    tiny_engine.generate(
        GenerationRequest(prompt="x", seed=1, **{**SMALL, "num_inference_steps": 5}),
        on_progress=lambda step, total: seen.append((step, total)),
    )
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_cancel_stops_within_one_step_and_the_engine_stays_usable(tiny_engine: GenerationEngine) -> None:
    steps: list[int] = []
    transformer_calls = 0

    def count_calls(module: Any, args: Any, output: Any) -> None:
        nonlocal transformer_calls
        transformer_calls += 1

    hook = tiny_engine.model.pipeline.transformer.register_forward_hook(count_calls)
    try:
        with pytest.raises(GenerationCanceled):
            tiny_engine.generate(
                GenerationRequest(prompt="x", seed=1, **{**SMALL, "num_inference_steps": 20}),
                on_progress=lambda step, total: steps.append(step),
                should_cancel=lambda: len(steps) >= 3,
            )
    finally:
        hook.remove()
    assert steps == [1, 2, 3]
    assert transformer_calls == 3  # one CFG-batched forward per step: nothing ran after the cancel
    [after] = generate(tiny_engine, seed=1)
    [reference] = generate(tiny_engine, seed=1)
    assert after == reference


def test_cancel_before_the_first_step_runs_nothing(tiny_engine: GenerationEngine) -> None:
    steps: list[int] = []
    with pytest.raises(GenerationCanceled):
        tiny_engine.generate(
            GenerationRequest(prompt="x", seed=1, **SMALL),
            on_progress=lambda step, total: steps.append(step),
            should_cancel=lambda: True,
        )
    assert steps == []


def test_out_of_memory_is_a_typed_error_and_the_next_request_succeeds(
    tiny_engine: GenerationEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    [reference] = generate(tiny_engine, seed=11)
    transformer = tiny_engine.model.pipeline.transformer
    real_forward = transformer.forward
    calls = 0

    def forward_that_runs_out_of_memory(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", forward_that_runs_out_of_memory)
    with pytest.raises(GenerationOutOfMemory) as caught:
        generate(tiny_engine, seed=11)
    assert caught.value.code == "out_of_memory"
    [after] = generate(tiny_engine, seed=11)
    assert after == reference


class TestImageToImage:
    @staticmethod
    def init_image(color: tuple[int, int, int] = (220, 60, 30), size: tuple[int, int] = (640, 480)) -> str:
        buffer = io.BytesIO()
        image = Image.new("RGB", size, color)
        image.paste((20, 20, 200), (100, 100, 300, 300))
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    def test_img2img_reuses_the_loaded_components_without_loading_again(
        self, tiny_engine: GenerationEngine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import diffusers

        def no_second_load(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("image-to-image must not load weights again")

        for cls in (diffusers.StableDiffusion3Pipeline, diffusers.StableDiffusion3Img2ImgPipeline):
            monkeypatch.setattr(cls, "from_pretrained", no_second_load)
        monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", no_second_load)
        result = tiny_engine.generate(
            GenerationRequest(prompt="x", seed=5, init_image=self.init_image(), num_inference_steps=4)
        )
        assert (result.images[0].width, result.images[0].height) == (640, 480)
        txt2img, img2img = tiny_engine.model.pipeline, tiny_engine.model.img2img()
        for name, module in txt2img.components.items():
            if isinstance(module, torch.nn.Module):
                assert getattr(img2img, name) is module, f"{name} was copied, not shared"

    def test_strength_sets_how_many_steps_run_and_changes_the_result(
        self, tiny_engine: GenerationEngine
    ) -> None:
        outputs, step_counts = [], []
        for strength in (0.3, 0.8):
            steps: list[tuple[int, int]] = []
            result = tiny_engine.generate(
                GenerationRequest(
                    prompt="x",
                    seed=5,
                    init_image=self.init_image(),
                    strength=strength,
                    num_inference_steps=10,
                ),
                on_progress=lambda step, total, steps=steps: steps.append((step, total)),  # type: ignore[misc]
            )
            outputs.append(result.images[0].data)
            step_counts.append(steps[-1])
        assert step_counts == [(3, 3), (8, 8)]
        assert np.abs(pixels(outputs[0]) - pixels(outputs[1])).max() > 0

    def test_the_init_image_matters_and_results_are_reproducible(self, tiny_engine: GenerationEngine) -> None:
        def run(color: tuple[int, int, int]) -> bytes:
            request = GenerationRequest(
                prompt="x",
                seed=5,
                init_image=self.init_image(color),
                width=512,
                height=512,
                num_inference_steps=4,
            )
            return tiny_engine.generate(request).images[0].data

        red, blue, red_again = run((220, 60, 30)), run((30, 60, 220)), run((220, 60, 30))
        assert red == red_again
        assert np.abs(pixels(red) - pixels(blue)).max() > 0


class TestPromptTokens:
    def test_counts_are_reported_for_prompt_and_negative_prompt(self, tiny_engine: GenerationEngine) -> None:
        result = tiny_engine.generate(
            GenerationRequest(prompt="a fox", negative_prompt="blur", seed=1, **SMALL)
        )
        counts = result.token_counts
        assert counts["prompt"]["clip_limit"] == 77 and counts["prompt"]["t5_limit"] == 256
        assert counts["prompt"]["clip"] > 2 and counts["prompt"]["t5"] > 1
        assert "negative_prompt" in counts
        assert result.warnings == []

    def test_truncation_and_long_t5_prompts_are_warned_about(self, tiny_engine: GenerationEngine) -> None:
        long_prompt = "a fox " * 100  # the tiny tokenizers split into characters: ~400 T5 tokens
        result = tiny_engine.generate(GenerationRequest(prompt=long_prompt, seed=1, **SMALL))
        assert any("CLIP" in w and "first 77" in w for w in result.warnings)
        assert any("T5" in w and "first 256" in w for w in result.warnings)
        result = tiny_engine.generate(
            GenerationRequest(prompt=long_prompt, max_sequence_length=512, seed=1, **SMALL)
        )
        assert any("more than the 256" in w for w in result.warnings)
        assert not any("first 512" in w for w in result.warnings)
