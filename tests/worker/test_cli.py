"""``python -m worker generate`` in separate processes: the same request and seed give the same bytes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def run_cli(*args: str, tiny_model_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DARKROOM_MODEL": "tiny", "DARKROOM_TINY_MODEL_DIR": str(tiny_model_dir)}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "worker", "generate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_same_request_and_seed_is_byte_identical_across_processes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    common = ["a red fox", "--aspect-ratio", "16:9", "--steps", "3"]
    outputs = []
    for name, seed in (("a.png", "7"), ("b.png", "7"), ("c.png", "8")):
        done = run_cli(*common, "--seed", seed, "-o", str(tmp_path / name), tiny_model_dir=tiny_model_dir)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    with Image.open(io.BytesIO(outputs[0])) as a, Image.open(io.BytesIO(outputs[2])) as c:
        assert a.size == (1344, 768)
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(c, dtype=np.int16)).max() > 10


def test_the_cli_reports_seeds_progress_and_writes_every_image(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = run_cli(
        "a fox",
        "--seed",
        "41",
        "--width",
        "512",
        "--height",
        "512",
        "--steps",
        "2",
        "--num-images",
        "2",
        "-o",
        str(tmp_path / "fox.webp"),
        tiny_model_dir=tiny_model_dir,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert [image["seed"] for image in summary["images"]] == [41, 42]
    assert summary["request"]["output_format"] == "webp"
    assert (tmp_path / "fox.webp").is_file() and (tmp_path / "fox-1.webp").is_file()
    # Not a terminal (stderr is a pipe): one line per step, no carriage returns (issue 15).
    steps = [line for line in done.stderr.splitlines() if line.startswith("step ")]
    assert steps == ["step 1/2", "step 2/2"] and "\r" not in done.stderr


def test_bad_arguments_are_reported_by_field_with_exit_code_2(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = run_cli("a fox", "--width", "1000", "--height", "1024", tiny_model_dir=tiny_model_dir)
    assert done.returncode == 2
    assert "error: width: " in done.stderr and "multiple of 16" in done.stderr


def test_an_unloadable_model_is_exit_code_1_with_the_reason(tmp_path: Path) -> None:
    done = run_cli("a fox", "--model", str(tmp_path / "missing"), tiny_model_dir=tmp_path)
    assert done.returncode == 1
    assert "model_unavailable" in done.stderr
