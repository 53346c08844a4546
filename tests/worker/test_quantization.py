"""Small-GPU mode (DARKROOM_QUANTIZE=nf4) on a machine that cannot run it: the settings and their refusals,
the 4-bit configs the loader asks diffusers and transformers for, and a real worker start that refuses.

A CPU cannot load bitsandbytes' 4-bit weights, so the one test of what reaches ``from_pretrained`` intercepts
the component loads (recording their keyword arguments, then loading the tiny model's component unquantised
so the pipeline still builds) and lets the start-up check pass: everything else is the worker's own path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from services.settings import Settings
from worker import quantization
from worker.errors import ModelUnavailableError
from worker.pipeline_loader import load_pipeline
from worker.quantization import QuantizationUnavailable

HAS_BITSANDBYTES = quantization._bitsandbytes_version() is not None

# --- settings ----------------------------------------------------------------------------------------------


def test_quantization_is_off_by_default_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert (Settings().quantize, Settings().quantize_t5) == ("none", False)
    monkeypatch.setenv("DARKROOM_QUANTIZE", "nf4")
    monkeypatch.setenv("DARKROOM_QUANTIZE_T5", "true")
    monkeypatch.setenv("DARKROOM_CPU_OFFLOAD", "true")
    settings = Settings()
    assert (settings.quantize, settings.quantize_t5, settings.cpu_offload) == ("nf4", True, True)
    monkeypatch.setenv("DARKROOM_QUANTIZE", "int4")
    with pytest.raises(ValueError, match="quantize"):
        Settings()


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"quantize": "nf4", "fp8": True}, "DARKROOM_FP8=true"),
        ({"quantize": "nf4", "fuse_qkv": True}, "DARKROOM_FUSE_QKV=true"),
        ({"quantize": "nf4", "quantize_t5": True, "drop_t5": True}, "no T5 encoder to quantise"),
        ({"quantize_t5": True}, "needs DARKROOM_QUANTIZE=nf4"),
    ],
)
def test_combinations_that_cannot_work_are_refused_by_name(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Settings(**fields)


def test_what_combines_with_nf4() -> None:
    settings = Settings(quantize="nf4", cpu_offload=True, drop_t5=True, compile=True, fuse_qkv="auto")
    assert quantization.quantized_components(settings) == ("transformer",)
    assert quantization.quantized_components(Settings(quantize="nf4", quantize_t5=True)) == (
        "transformer",
        "text_encoder_3",
    )
    assert quantization.quantized_components(Settings()) == ()


# --- the configs the loader asks for ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_nf4_recipe_is_the_model_cards(dtype: torch.dtype) -> None:
    assert quantization.nf4_recipe(dtype) == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": dtype,
    }


@pytest.mark.skipif(
    not HAS_BITSANDBYTES, reason="both libraries' BitsAndBytesConfig need bitsandbytes installed"
)
def test_quantization_configs_are_each_librarys_bitsandbytes_config() -> None:
    import diffusers
    import transformers

    configs = quantization.quantization_configs(Settings(quantize="nf4", quantize_t5=True), torch.bfloat16)
    assert isinstance(configs["transformer"], diffusers.BitsAndBytesConfig)
    assert isinstance(configs["text_encoder_3"], transformers.BitsAndBytesConfig)
    for config in configs.values():
        assert config.load_in_4bit and not config.load_in_8bit
        assert config.bnb_4bit_quant_type == "nf4"
        assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert list(quantization.quantization_configs(Settings(quantize="nf4"), torch.bfloat16)) == [
        "transformer"
    ]
    assert quantization.quantization_configs(Settings(), torch.bfloat16) == {}


def test_the_loader_passes_4bit_configs_to_each_components_from_pretrained(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_pipeline -> load_quantized -> SD3Transformer2DModel / T5EncoderModel.from_pretrained with a 4-bit
    NF4 quantization_config, and the modules they return are the pipeline's."""
    from diffusers import SD3Transformer2DModel
    from transformers import T5EncoderModel

    monkeypatch.setattr(quantization, "nf4_problems", lambda device: [])  # as on a CUDA machine with bnb
    if not HAS_BITSANDBYTES:  # the configs are then the recipe itself (tested above with the real classes)
        monkeypatch.setattr(
            quantization,
            "quantization_configs",
            lambda settings, dtype: {
                name: SimpleNamespace(**quantization.nf4_recipe(dtype), load_in_8bit=False)
                for name in quantization.quantized_components(settings)
            },
        )
    calls: dict[str, dict[str, Any]] = {}
    returned: dict[str, Any] = {}

    def intercept(cls: Any, name: str) -> Any:
        real = cls.from_pretrained.__func__

        def from_pretrained(klass: Any, location: str, **kwargs: Any) -> Any:
            calls[name] = {"location": location, **kwargs}
            kwargs.pop("quantization_config")  # a CPU cannot hold 4-bit weights: load the module as stored
            returned[name] = real(klass, location, **kwargs)
            return returned[name]

        return classmethod(from_pretrained)

    monkeypatch.setattr(
        SD3Transformer2DModel, "from_pretrained", intercept(SD3Transformer2DModel, "transformer")
    )
    monkeypatch.setattr(T5EncoderModel, "from_pretrained", intercept(T5EncoderModel, "text_encoder_3"))

    model = load_pipeline(Settings(model="tiny", quantize="nf4", quantize_t5=True, warmup=False))

    assert set(calls) == {"transformer", "text_encoder_3"}
    for name, call in calls.items():
        assert call["location"] == str(tiny_model_dir) and call["subfolder"] == name
        config = call["quantization_config"]
        assert config.load_in_4bit is True and config.load_in_8bit is False
        assert config.bnb_4bit_quant_type == "nf4"
        assert config.bnb_4bit_compute_dtype == model.dtype == call["dtype"]
    assert model.pipeline.transformer is returned["transformer"]
    assert model.pipeline.text_encoder_3 is returned["text_encoder_3"]
    assert model.optimizations["quantize"] == "nf4+t5"
    assert (
        "fused_qkv" not in model.optimizations
    )  # 'auto' is off on CPU; on CUDA the transformer stays unfused


def test_on_cuda_auto_fusing_leaves_an_nf4_transformer_unfused(tiny_model_dir: Path) -> None:
    """Fusing concatenates q/k/v weights, which 4-bit storage cannot take: with NF4 the 'auto' switch (on
    for CUDA) fuses only what is not quantised. Nothing here runs on the device, so a CPU can check it."""
    from worker.optimizations import apply_optimizations, attention_processors
    from worker.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    applied = apply_optimizations(pipe, Settings(quantize="nf4"), torch.device("cuda"))
    assert "transformer" not in applied["fused_qkv"]
    assert "FusedQKNormJointAttnProcessor" not in set(attention_processors(pipe.transformer).values())
    assert applied["quantize"] == "nf4"
    fused = apply_optimizations(build_tiny_pipeline(), Settings(), torch.device("cuda"))
    assert "transformer" in fused["fused_qkv"]  # the same switch without NF4


# --- refusals: where it cannot run -------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_loader_refuses_naming_the_setting(tiny_model_dir: Path) -> None:
    with pytest.raises(QuantizationUnavailable) as info:
        load_pipeline(Settings(model="tiny", quantize="nf4", warmup=False))
    message = str(info.value)
    assert "DARKROOM_QUANTIZE=nf4" in message and "CUDA GPU" in message and "runs on cpu" in message
    assert isinstance(info.value, ModelUnavailableError) and info.value.code == "model_unavailable"


def test_without_bitsandbytes_the_refusal_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not importable, whether installed or not
    problems = quantization.nf4_problems(torch.device("cuda"))
    assert any("bitsandbytes is not installed" in p and ".[worker,nf4]" in p for p in problems)
    with pytest.raises(QuantizationUnavailable, match=r"DARKROOM_QUANTIZE=nf4 .*\.\[worker,nf4\]"):
        quantization.quantization_configs(Settings(quantize="nf4"), torch.bfloat16)


def test_the_gpu_bench_refuses_nf4_where_the_worker_would() -> None:
    from bench.gpu import load_quantized_like_the_worker

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    with pytest.raises(QuantizationUnavailable, match="DARKROOM_QUANTIZE=nf4"):
        load_quantized_like_the_worker(object(), Settings(quantize="nf4"), torch.device("cpu"), torch.float32)
    assert load_quantized_like_the_worker(object(), Settings(), torch.device("cpu"), torch.float32) == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_worker_started_with_nf4_on_a_machine_without_cuda_exits_3_naming_the_setting(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "DARKROOM_MODEL": "tiny",
        "DARKROOM_TINY_MODEL_DIR": str(tmp_path / "tiny"),
        "DARKROOM_QUANTIZE": "nf4",
        "DARKROOM_REDIS_URL": "redis://127.0.0.1:9/0",  # never reached: the model check comes first
        "DARKROOM_STORAGE_URL": (tmp_path / "out").as_uri(),
        "DARKROOM_READY_FILE": str(tmp_path / "ready"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "worker"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in (done.stdout + done.stderr).splitlines() if line.startswith("{")]
    refusal = next(line for line in lines if line.get("event") == "model unavailable")
    assert refusal["level"] == "error"
    assert refusal["reason"].startswith("DARKROOM_QUANTIZE=nf4 cannot run here: it needs a CUDA GPU")
    if not HAS_BITSANDBYTES:
        assert ".[worker,nf4]" in refusal["reason"]
    assert not (tmp_path / "ready").exists()
    assert not (tmp_path / "tiny").exists()  # refused before any weights were built or read
