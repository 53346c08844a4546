"""The offline tiny model: built with no network, SD3.5-M's geometry, loaded through from_pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Runs in a fresh interpreter with HF_HUB_OFFLINE=1 and every socket connection refused, so a hidden download
# (tokenizer, config, weights) fails loudly instead of passing on a machine that happens to have a cache.
OFFLINE_BUILD_AND_LOAD = textwrap.dedent(
    """
    import json, socket, sys
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline build")
    socket.socket.connect = refuse
    socket.create_connection = refuse
    import diffusers
    calls = []
    real = diffusers.StableDiffusion3Pipeline.from_pretrained.__func__
    def spy(cls, location, **kwargs):
        calls.append(str(location))
        return real(cls, location, **kwargs)
    diffusers.StableDiffusion3Pipeline.from_pretrained = classmethod(spy)
    from services.settings import Settings
    from worker.pipeline_loader import load_pipeline
    model = load_pipeline(Settings(model="tiny", warmup=False))
    pipe = model.pipeline
    import torch
    print(json.dumps({
        "from_pretrained": calls,
        "source": model.source,
        "vae_scale_factor": pipe.vae_scale_factor,
        "latent_channels": pipe.vae.config.latent_channels,
        "vae_blocks": len(pipe.vae.config.block_out_channels),
        "patch_size": pipe.transformer.config.patch_size,
        "in_channels": pipe.transformer.config.in_channels,
        "qk_norm": pipe.transformer.config.qk_norm,
        "dual_attention_layers": list(pipe.transformer.config.dual_attention_layers),
        "num_layers": pipe.transformer.config.num_layers,
        "encoders": [type(pipe.text_encoder).__name__, type(pipe.text_encoder_2).__name__,
                     type(pipe.text_encoder_3).__name__],
        "clip_max_length": [pipe.tokenizer.model_max_length, pipe.tokenizer_2.model_max_length],
        "scheduler": [type(pipe.scheduler).__name__, pipe.scheduler.config.shift,
                      pipe.scheduler.config.num_train_timesteps],
        "training": [m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module)],
        "dtype": str(model.dtype),
        "device": str(model.device),
    }))
    """
)


def test_tiny_model_builds_offline_and_loads_through_from_pretrained(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty cache: nothing to fall back on
        "DARKROOM_TINY_MODEL_DIR": str(folder),
    }
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_BUILD_AND_LOAD],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["from_pretrained"] == [str(folder)]
    assert facts["source"] == "tiny"
    assert facts["vae_scale_factor"] == 8 and facts["vae_blocks"] == 4
    assert facts["latent_channels"] == 16 and facts["in_channels"] == 16
    assert facts["patch_size"] == 2 and facts["qk_norm"] == "rms_norm"
    assert facts["dual_attention_layers"] and facts["num_layers"] >= 10  # SLG layers 7,8,9 exist
    assert facts["encoders"] == [
        "CLIPTextModelWithProjection",
        "CLIPTextModelWithProjection",
        "T5EncoderModel",
    ]
    assert facts["clip_max_length"] == [77, 77]
    assert facts["scheduler"] == ["FlowMatchEulerDiscreteScheduler", 3.0, 1000]
    assert facts["training"] and not any(facts["training"])
    assert (facts["device"], facts["dtype"]) == ("cpu", "torch.float32")
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert size < 10 * 1024 * 1024, f"tiny model is {size} bytes"
    assert (folder / "model_index.json").is_file()


def test_the_cache_is_reused_and_a_partial_build_is_never_visible(tmp_path: Path) -> None:
    from worker.tiny_model import ensure_tiny_model

    folder = ensure_tiny_model(tmp_path / "tiny")
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path / "tiny") == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no staging folders left behind


def test_two_builds_are_identical(tmp_path: Path) -> None:
    from worker.tiny_model import ensure_tiny_model

    first = ensure_tiny_model(tmp_path / "a") / "transformer" / "diffusion_pytorch_model.safetensors"
    second = ensure_tiny_model(tmp_path / "b") / "transformer" / "diffusion_pytorch_model.safetensors"
    assert first.read_bytes() == second.read_bytes()
