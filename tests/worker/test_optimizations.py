"""The speed switches on the tiny model: settings, each switch on vs off within tolerance, no recompiles.

Tolerances (fp32 on CPU): fused QKV and channels-last only reorder floating-point sums, so final latents
agree to a relative L2 below 1e-5 and decoded pixels to 1e-5; the compiled pipeline (eager backend here,
inductor in the slow test) to 1e-4.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from schemas.sizes import ASPECT_RATIO_SIZES
from services.settings import Settings
from worker import optimizations as opt
from worker.errors import ModelUnavailableError

TOKENS = 77  # the pipeline's CLIP part; the T5 part is max_sequence_length


def tiny() -> Any:
    from worker.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: Any, output_type: str = "latent", **fields: Any) -> torch.Tensor:
    options = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "width": 256,
        "height": 256,
        "num_inference_steps": 2,
        "max_sequence_length": 77,
        **fields,
    }
    images = options.get("num_images_per_prompt", 1)
    generators = [torch.Generator("cpu").manual_seed(5 + i) for i in range(images)]
    with torch.inference_mode():
        out = pipe(**options, generator=generators, output_type=output_type).images
    return torch.as_tensor(out).float()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="module")
def reference() -> tuple[Any, torch.Tensor]:
    pipe = tiny()
    return pipe, run(pipe, num_images_per_prompt=2)


# --- settings ----------------------------------------------------------------------------------------------


def test_settings_defaults_and_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.tf32, s.sdpa_backends, s.fuse_qkv, s.channels_last_vae, s.compile) == (
        True,
        "auto",
        "auto",
        "auto",
        False,  # compile is opt-in until it has been measured on a GPU
    )
    assert (s.prompt_cache_size, s.fp8, s.compile_warmup) == (32, False, True)
    for name, value in {
        "FUSE_QKV": "false",
        "CHANNELS_LAST_VAE": "true",
        "COMPILE": "1",
        "SDPA_BACKENDS": "flash,efficient",
        "COMPILE_CACHE_DIR": "/var/cache/darkroom",
        "FP8": "true",
        "FP8_RECIPE": "weight_only",
    }.items():
        monkeypatch.setenv(f"DARKROOM_{name}", value)
    s = Settings()
    assert (s.fuse_qkv, s.channels_last_vae, s.compile) == (False, True, True)
    assert s.sdpa_backends == "flash,efficient" and str(s.compile_cache_dir) == "/var/cache/darkroom"
    assert s.fp8 and s.fp8_recipe == "weight_only"
    for bad in ({"sdpa_backends": "flash,warp"}, {"fuse_qkv": "sometimes"}, {"compile_mode": "fastest"}):
        with pytest.raises(ValueError):
            Settings(**bad)


def test_auto_means_on_for_cuda_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert opt.switch_on("auto", cuda) and not opt.switch_on("auto", cpu)
    assert opt.switch_on(True, cpu) and not opt.switch_on(False, cuda)


def test_cpu_defaults_change_nothing_but_check_attention() -> None:
    pipe = tiny()
    applied = opt.apply_optimizations(pipe, Settings(), torch.device("cpu"))
    assert set(applied) == {"attention"}
    assert set(applied["attention"]) == {"JointAttnProcessor2_0"}
    assert not hasattr(pipe.transformer, "_darkroom_compiled")


# --- each switch on vs off ----------------------------------------------------------------------------------


def test_tf32_and_sdpa_backend_flags_are_set_and_restorable() -> None:
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.cudnn_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    try:
        opt.set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert opt.restrict_sdpa("flash,math") == ["flash", "math"]
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert opt.restrict_sdpa("auto") == list(opt.SDPA_BACKENDS)
        with pytest.raises(ValueError):
            opt.restrict_sdpa("flash,warp")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.backends.cuda.enable_flash_sdp(saved[2])
        torch.backends.cuda.enable_mem_efficient_sdp(saved[3])
        torch.backends.cuda.enable_cudnn_sdp(saved[4])
        torch.backends.cuda.enable_math_sdp(saved[5])


def test_attention_is_put_back_on_sdpa() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    pipe = tiny()
    pipe.transformer.set_attn_processor(AttnProcessor())
    assert opt.ensure_sdpa(pipe) == {"JointAttnProcessor2_0": 15}


def test_fused_qkv_matches_unfused(reference: tuple[Any, torch.Tensor]) -> None:
    _, expected = reference
    pipe = tiny()
    assert opt.fuse_qkv(pipe) == ["transformer"]  # the tiny VAE has no attention; SD3.5's has one block
    # Every module (the joint ones and the dual-attention blocks' self-attention attn2) reads one to_qkv.
    assert set(opt.attention_processors(pipe.transformer).values()) == {"FusedQKNormJointAttnProcessor"}
    attention = pipe.transformer.transformer_blocks[0].attn
    assert attention.to_q.weight.data_ptr() == attention.to_qkv.weight.data_ptr()  # no second copy
    assert rel_l2(run(pipe, num_images_per_prompt=2), expected) < 1e-5


def test_channels_last_vae_decodes_the_same_pixels(reference: tuple[Any, torch.Tensor]) -> None:
    pipe, _ = reference
    expected = run(pipe, output_type="np")
    other = tiny()
    opt.vae_channels_last(other)
    conv = next(m for m in other.vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert float((run(other, output_type="np") - expected).abs().max()) < 1e-5


def test_fp8_is_refused_clearly_without_cuda() -> None:
    with pytest.raises(ModelUnavailableError, match="CUDA"):
        opt.apply_optimizations(tiny(), Settings(fp8=True), torch.device("cpu"))


# --- torch.compile: dynamic shapes, no recompiles -----------------------------------------------------------


@pytest.mark.slow  # ~30 s of tracing on 2 cores; CI runs it in `make test-slow`
def test_one_graph_serves_every_preset_batch_and_text_length() -> None:
    """After the warm-up shapes (batch 2 and 1), every preset at 1..4 images, guided or not, at every text
    length, runs without compiling again (``error_on_recompile``). On the meta device: shapes, dtypes and
    guards are the real ones, without the arithmetic."""
    pipe = tiny()
    transformer, decoder = pipe.transformer.to("meta"), pipe.vae.decoder.to("meta")
    opt.compile_forward(transformer, opt.TRANSFORMER_DYNAMIC, backend="eager")
    opt.compile_forward(decoder, opt.VAE_DECODER_DYNAMIC, backend="eager")
    config = transformer.config

    def step(batch: int, width: int, height: int, text: int = 256) -> None:
        # Exactly the keywords StableDiffusion3Pipeline passes.
        transformer(
            hidden_states=torch.empty(batch, 16, height // 8, width // 8, device="meta"),
            timestep=torch.empty((), device="meta").expand(batch),
            encoder_hidden_states=torch.empty(
                batch, TOKENS + text, config.joint_attention_dim, device="meta"
            ),
            pooled_projections=torch.empty(batch, config.pooled_projection_dim, device="meta"),
            joint_attention_kwargs=None,
            return_dict=False,
        )

    def decode(batch: int, width: int, height: int) -> None:
        decoder(torch.empty(batch, 16, height // 8, width // 8, device="meta"))

    graphs = opt.compiled_graphs()
    step(2, 1024, 1024), step(1, 1024, 1024), decode(1, 1024, 1024), decode(2, 1024, 1024)
    assert opt.compiled_graphs() - graphs == 4  # two per module: batch >= 2 and batch 1
    graphs = opt.compiled_graphs()
    torch._dynamo.config.error_on_recompile = True
    try:
        for width, height in ASPECT_RATIO_SIZES.values():
            for images in (1, 2, 3, 4):
                step(2 * images, width, height)  # guided: negative + positive rows
                decode(images, width, height)
            step(1, width, height)  # unguided, one image
        for text in (77, 512):
            step(8, 1344, 768, text)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert opt.compiled_graphs() == graphs


def test_the_compiled_pipeline_agrees_and_does_not_recompile(reference: tuple[Any, torch.Tensor]) -> None:
    """The real call path (prompt embeddings, scheduler, VAE) through the compiled modules: warm-up, then
    other sizes and image counts compile nothing and match the uncompiled pipeline."""
    eager, _ = reference
    pipe = tiny()
    # The transformer only (the VAE decoder's two graphs are proven above and in the slow test): seconds.
    assert opt.compile_pipeline(pipe, vae=False, backend="eager") == ["transformer"]
    warm = opt.warm_up_presets(pipe, sizes=[(256, 256)], max_sequence_length=77)
    assert warm["graphs_compiled"] == 2 and len(warm["calls"]) == 3
    graphs = opt.compiled_graphs()
    torch._dynamo.config.error_on_recompile = True
    try:
        for size, images in (((320, 192), 3), ((192, 320), 1)):
            fields = {"width": size[0], "height": size[1], "num_images_per_prompt": images}
            assert rel_l2(run(pipe, **fields), run(eager, **fields)) < 1e-4
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert opt.compiled_graphs() == graphs


def test_compile_cache_dir_is_where_inductor_writes(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unchanged")
    monkeypatch.setenv("TRITON_CACHE_DIR", "unchanged")
    folder = opt.configure_compile_cache(tmp_path / "compile")
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(folder / "inductor")
    import torch._inductor.config as inductor_config

    assert inductor_config.fx_graph_cache


@pytest.mark.slow
@pytest.mark.inductor
def test_inductor_compiles_once_for_every_preset_and_batch(tmp_path: Any) -> None:
    """The real thing: inductor kernels, every preset at full size, 1..4 images, no recompiles after the
    warm-up (minutes on a small CPU)."""
    eager = tiny()
    pipe = tiny()
    opt.configure_compile_cache(tmp_path)
    opt.compile_pipeline(pipe)
    warm = opt.warm_up_presets(pipe, max_sequence_length=77)
    assert warm["graphs_compiled"] == 4
    assert rel_l2(run(pipe, width=512, height=512), run(eager, width=512, height=512)) < 1e-4
    graphs = opt.compiled_graphs()
    torch._dynamo.config.error_on_recompile = True
    try:
        for (width, height), images in zip(ASPECT_RATIO_SIZES.values(), (1, 2, 3, 4) * 3, strict=False):
            run(pipe, width=width, height=height, num_images_per_prompt=images, num_inference_steps=1)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert opt.compiled_graphs() == graphs


@pytest.mark.gpu
def test_gpu_switches_and_fp8_agree_with_bf16() -> None:
    """On CUDA at tiny size: the default switches (compile included) and FP8 against plain bf16."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    plain = tiny().to(device=device, dtype=torch.bfloat16)
    expected = run(plain)
    fast = tiny().to(device=device, dtype=torch.bfloat16)
    opt.apply_optimizations(fast, Settings(compile=True, compile_warmup=False), device)
    assert rel_l2(run(fast), expected) < 0.02
    if torch.cuda.get_device_capability(device) >= (8, 9):
        pytest.importorskip("torchao")
        fp8 = tiny().to(device=device, dtype=torch.bfloat16)
        opt.apply_optimizations(fp8, Settings(fp8=True, compile=False), device)
        assert rel_l2(run(fp8), expected) < 0.2
