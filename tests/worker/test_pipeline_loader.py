"""The loader: real-model path as far as it goes offline, local folders, device/dtype, memory modes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from services.settings import DEFAULT_MODEL, Settings
from worker.errors import ModelUnavailableError
from worker.pipeline_loader import load_pipeline, resolve_device, resolve_dtype, resolve_source

# The hub path with no network: the loader must fail naming the model and how to get it, and must not fall
# back to the tiny model (its builder is booby-trapped here).
HUB_OFFLINE = textwrap.dedent(
    """
    import json, socket
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")
    socket.socket.connect = refuse
    import worker.pipeline_loader as loader
    def no_tiny(*args, **kwargs):
        raise AssertionError("silently swapped for the tiny model")
    loader.ensure_tiny_model = no_tiny
    from services.settings import Settings
    from worker.errors import ModelUnavailableError
    try:
        loader.load_pipeline(Settings(warmup=False))
    except ModelUnavailableError as exc:
        print(json.dumps({"code": exc.code, "message": str(exc)}))
    """
)


def test_the_real_model_path_fails_clearly_offline_and_never_swaps_models(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("DARKROOM_MODEL", None)
    done = subprocess.run(
        [sys.executable, "-c", HUB_OFFLINE], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    error = json.loads(done.stdout.strip().splitlines()[-1])
    assert error["code"] == "model_unavailable"
    message = error["message"]
    assert DEFAULT_MODEL in message
    assert "huggingface-cli login" in message and "HF_TOKEN" in message
    assert "huggingface-cli download" in message


def test_default_model_is_sd35_medium_from_the_hub() -> None:
    assert Settings().model == "stabilityai/stable-diffusion-3.5-medium"
    assert resolve_source(DEFAULT_MODEL) == (DEFAULT_MODEL, "hub")


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("/no/such/folder", "neither an existing folder"),
        ("./relative/missing", "neither an existing folder"),
        ("not a model id", "neither an existing folder"),
    ],
)
def test_bad_model_settings_are_explained(model: str, needle: str) -> None:
    with pytest.raises(ModelUnavailableError, match=needle):
        resolve_source(model)


def test_a_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="model_index.json"):
        resolve_source(str(tmp_path))


def test_a_local_folder_loads_through_the_same_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sd35m-copy"
    shutil.copytree(tiny_model_dir, folder)
    model = load_pipeline(Settings(model=str(folder), warmup=False))
    assert model.source == "local" and model.model == str(folder)
    assert model.pipeline.vae_scale_factor == 8


def test_device_and_dtype_are_automatic_and_overridable() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_device("cpu") == torch.device("cpu")


def test_settings_come_from_darkroom_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARKROOM_MODEL", "tiny")
    monkeypatch.setenv("DARKROOM_DROP_T5", "true")
    monkeypatch.setenv("DARKROOM_CPU_OFFLOAD", "1")
    monkeypatch.setenv("DARKROOM_DTYPE", "bfloat16")
    settings = Settings()
    assert (settings.model, settings.drop_t5, settings.cpu_offload, settings.dtype) == (
        "tiny",
        True,
        True,
        "bfloat16",
    )
    monkeypatch.setenv("DARKROOM_DTYPE", "float8")
    with pytest.raises(ValueError, match="dtype"):
        Settings()


def test_without_t5_the_engine_still_generates_and_says_so(tiny_model_dir: Path) -> None:
    from schemas.generation import GenerationRequest
    from worker.engine import GenerationEngine

    model = load_pipeline(Settings(model="tiny", drop_t5=True, warmup=False))
    assert model.pipeline.text_encoder_3 is None
    engine = GenerationEngine(model)
    result = engine.generate(
        GenerationRequest(prompt="a fox " * 20, seed=1, width=512, height=512, num_inference_steps=2)
    )
    assert len(result.images) == 1
    assert result.token_counts["prompt"]["t5"] is None
    assert any("no T5 encoder" in warning for warning in result.warnings)


def test_cpu_offload_on_a_cpu_device_is_a_no_op_not_a_crash(tiny_model_dir: Path) -> None:
    model = load_pipeline(Settings(model="tiny", cpu_offload=True, warmup=False))
    assert model.device.type == "cpu"
    assert model.pipeline.transformer.device.type == "cpu"


def test_warm_up_runs_a_generation(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    assert tiny_engine.warm_up() > 0
