"""Inpainting on the tiny model: the SD3 inpaint pipeline over the loaded modules, the mask honoured.

The tiny model's VAE is random, so "the kept area looks like the init image" cannot be checked against the
init image itself: it is checked against the init image's VAE round trip, drawn with the same generator as
the pipeline's own encode (the posterior is sampled, and the tiny VAE's variance is large).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.generation import GenerationRequest
from worker.engine import GenerationEngine, coalesce_key

SIZE = 512
SEED = 5


def encoded(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def init_image() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (220, 60, 30))
    image.paste((20, 20, 200), (60, 60, 200, 200))
    image.paste((240, 240, 240), (320, 300, 460, 460))
    return image


def right_half_mask() -> Image.Image:
    """White (repaint) on the right half, black (keep) on the left: diffusers' convention."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (SIZE // 2, 0, SIZE, SIZE))
    return mask


def inpaint_request(**fields: Any) -> GenerationRequest:
    return GenerationRequest(
        **{
            "prompt": "a lighthouse",
            "init_image": encoded(init_image()),
            "mask_image": encoded(right_half_mask()),
            "seed": SEED,
            "width": SIZE,
            "height": SIZE,
            "num_inference_steps": 4,
            **fields,
        }
    )


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def vae_round_trip(pipeline: Any, image: Image.Image, seed: int) -> np.ndarray:
    """``image`` encoded (posterior sampled as the pipeline samples it) and decoded again."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint import retrieve_latents

    with torch.inference_mode():
        tensor = pipeline.image_processor.preprocess(image, height=SIZE, width=SIZE)
        latents = retrieve_latents(
            pipeline.vae.encode(tensor), generator=torch.Generator("cpu").manual_seed(seed)
        )
        decoded = pipeline.vae.decode(latents).sample
    [result] = pipeline.image_processor.postprocess(decoded, output_type="pil")
    return np.asarray(result, dtype=np.int16)


def test_inpainting_shares_the_loaded_modules_and_loads_nothing_again(
    tiny_engine: GenerationEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers

    def no_second_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("inpainting must not load weights again")

    for cls in (diffusers.StableDiffusion3Pipeline, diffusers.StableDiffusion3InpaintPipeline):
        monkeypatch.setattr(cls, "from_pretrained", no_second_load)
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", no_second_load)
    result = tiny_engine.generate(inpaint_request())
    assert (result.images[0].width, result.images[0].height) == (SIZE, SIZE)
    txt2img, inpaint = tiny_engine.model.pipeline, tiny_engine.model.inpaint()
    assert isinstance(inpaint, diffusers.StableDiffusion3InpaintPipeline)
    assert inpaint is tiny_engine.model.inpaint()  # built once
    for name, module in txt2img.components.items():
        if isinstance(module, torch.nn.Module):
            assert getattr(inpaint, name) is module, f"{name} was copied, not shared"


def test_the_kept_half_follows_the_init_image_and_the_masked_half_is_repainted(
    tiny_engine: GenerationEngine,
) -> None:
    out = pixels(tiny_engine.generate(inpaint_request(strength=1.0)).images[0].data)
    reference = vae_round_trip(tiny_engine.model.inpaint(), init_image(), SEED)
    # Away from the mask's edge (the decoder's receptive field crosses it), left: kept, right: repainted.
    kept = np.abs(out[:, : SIZE // 4] - reference[:, : SIZE // 4]).mean()
    repainted = np.abs(out[:, 3 * SIZE // 4 :] - reference[:, 3 * SIZE // 4 :]).mean()
    assert kept < repainted / 2, (kept, repainted)

    # The same request with nothing masked (all black) keeps the right half too: it is the mask at work.
    black = encoded(Image.new("L", (SIZE, SIZE), 0))
    kept_all = pixels(tiny_engine.generate(inpaint_request(strength=1.0, mask_image=black)).images[0].data)
    kept_right = np.abs(kept_all[:, 3 * SIZE // 4 :] - reference[:, 3 * SIZE // 4 :]).mean()
    assert kept_right < repainted / 2, (kept_right, repainted)


def test_strength_is_honoured_and_results_are_reproducible_by_seed(tiny_engine: GenerationEngine) -> None:
    steps: list[tuple[int, int]] = []
    first = tiny_engine.generate(
        inpaint_request(strength=0.5),
        on_progress=lambda step, total: steps.append((step, total)),
    )
    assert steps[-1] == (2, 2)  # strength 0.5 of 4 steps
    again = tiny_engine.generate(inpaint_request(strength=0.5))
    other_seed = tiny_engine.generate(inpaint_request(strength=0.5, seed=SEED + 1))
    assert first.images[0].data == again.images[0].data
    assert first.images[0].data != other_seed.images[0].data


def test_the_png_records_the_masks_hash_and_inpainting_never_coalesces(tiny_engine: GenerationEngine) -> None:
    request = inpaint_request(num_inference_steps=1, strength=1.0)
    assert coalesce_key(request) is None
    [image] = tiny_engine.generate(request).images
    with Image.open(io.BytesIO(image.data)) as png:
        metadata = json.loads(png.text["darkroom"])["request"]
    assert request.mask_image is not None and request.init_image is not None
    assert metadata["mask_image_sha256"] == hashlib.sha256(base64.b64decode(request.mask_image)).hexdigest()
    assert metadata["init_image_sha256"] == hashlib.sha256(base64.b64decode(request.init_image)).hexdigest()
    assert "mask_image" not in metadata and "init_image" not in metadata
