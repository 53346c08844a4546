"""``make run``'s launcher: up from nothing, a curl POST gives a PNG, the hub-model fallback is loud, and
Ctrl-C / SIGTERM leave no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.net import free_port

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes once its parent reaped it or it is Z.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def _wait_for_line(log: Path, needle: str, process: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if needle in text:
            return text
        if process.poll() is not None:
            raise AssertionError(f"launcher exited with {process.returncode}:\n{text[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} not seen in {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_run_command_serves_a_png_and_stops_cleanly(
    tmp_path: Path, tiny_model_dir: Path, stop_signal: signal.Signals
) -> None:
    curl = shutil.which("curl")
    port = free_port()
    log = tmp_path / "launcher.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # no weights reachable: the launcher must fall back loudly
        "HF_HOME": str(tmp_path / "hf"),
        "DARKROOM_TINY_MODEL_DIR": str(tiny_model_dir),
        "DARKROOM_DEV_PORT": str(port),
        "DARKROOM_DEV_DIR": str(tmp_path / "state"),
    }
    env.pop("DARKROOM_MODEL", None)
    with log.open("wb") as sink:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "devtools.devstack"],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        text = _wait_for_line(log, "ready:", launcher, timeout=120)
        assert "RUNNING THE OFFLINE TINY MODEL" in text and "huggingface-cli login" in text
        # Offline with nothing cached: straight to the tiny model, no worker tried (and failed) the hub.
        assert "HF_HUB_OFFLINE is set" in text and "see the worker's error" not in text
        assert "a worker of model tiny is loaded and warm" in text
        pids = json.loads((tmp_path / "state" / "pids.json").read_text())
        assert set(pids) == {"api", "worker", "webhooks", "redis"}

        started = time.monotonic()
        body = json.dumps({"prompt": "a red fox", "width": 512, "height": 512, "num_inference_steps": 4})
        post = [f"http://127.0.0.1:{port}/v1/generations", "-H", "Content-Type: application/json"]
        post += ["-H", "Prefer: wait=60", "-d", body]
        if curl:
            answer = subprocess.run(
                [curl, "-sS", "-X", "POST", *post], capture_output=True, timeout=90, check=True
            )
            job = json.loads(answer.stdout)
        else:  # pragma: no cover - curl ships with the CI image; keep the test meaningful without it
            import httpx

            job = httpx.post(post[0], content=body, headers={"Prefer": "wait=60"}, timeout=90).json()
        assert job["status"] == "succeeded", job
        # The fallback restarted the API too: the tiny model is its default, and the job says so.
        assert job["request"]["model"] == "tiny", job
        png = tmp_path / "out.png"
        if curl:
            subprocess.run([curl, "-sS", "-o", str(png), job["images"][0]["url"]], timeout=30, check=True)
        else:  # pragma: no cover
            import httpx

            png.write_bytes(httpx.get(job["images"][0]["url"], timeout=30).content)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert time.monotonic() - started < 60
    finally:
        launcher.send_signal(stop_signal)
        code = launcher.wait(timeout=60)
    assert code == 0, log.read_text()[-4000:]
    assert "stopped" in log.read_text()
    leftovers = {name: pid for name, pid in pids.items() if _alive(pid)}
    assert leftovers == {}, f"still running after {stop_signal.name}: {leftovers}"
    assert not (tmp_path / "state" / "pids.json").exists()


def test_the_fallback_is_decided_up_front_only_when_the_weights_cannot_be_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from devtools.devstack import _hub_unreachable

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    offline = {"HF_HUB_OFFLINE": "1"}
    assert _hub_unreachable("tiny", offline) is None
    assert _hub_unreachable(str(tmp_path), offline) is None  # a local folder: the worker reads it
    reason = _hub_unreachable("stabilityai/stable-diffusion-3.5-medium", offline)
    assert reason is not None and "HF_HUB_OFFLINE" in reason
    # Cached weights load offline: the worker is tried.
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: "/cache/x")
    assert _hub_unreachable("stabilityai/stable-diffusion-3.5-medium", offline) is None
