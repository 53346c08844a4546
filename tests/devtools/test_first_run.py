"""The first run, as a newcomer does it: a fresh clone, the README's run command, its "ready", the README's
CPU quick-start request exactly as written, an image back, Ctrl-C, nothing left running.

Slow (``make test-slow``): the clone's ``make run`` installs its own ``.venv`` (the runtime extras, from
the machine's package index). Only committed files are in the clone. The hub is never tried
(``HF_HUB_OFFLINE=1``): the launcher goes straight to the tiny model. The README's port (8000) is used when
free; otherwise the launcher's ``DARKROOM_DEV_PORT`` moves it and the request's address follows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_PORT = 8000
INSTALL_AND_READY_S = 1500.0  # a cold pip install of torch & co. on a busy 2-core machine, then the model
REQUEST_S = 90.0
STOP_S = 60.0


def readme_example(name: str) -> str:
    """The fenced bash block right after ``<!-- example: NAME -->`` in README.md."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- example: {re.escape(name)} -->\s*```bash\n(.*?)```", text, re.DOTALL)
    assert found, f"README.md has no '<!-- example: {name} -->' bash block"
    return found.group(1)


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (walks /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_a_fresh_clone_runs_the_readme_and_answers_its_cpu_request(tmp_path: Path) -> None:
    clone = tmp_path / "darkroom"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    run = readme_example("run")
    request = readme_example("cpu-request")
    port = README_PORT if port_free(README_PORT) else None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1"}
    for name in [name for name in env if name.startswith("DARKROOM_") or name == "VIRTUAL_ENV"]:
        env.pop(name)
    if port is None:  # the README's port is taken on this machine: move the stack and the request with it
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env["DARKROOM_DEV_PORT"] = str(port)
        request = request.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{port}")
    log = tmp_path / "run.log"
    started = time.monotonic()
    with log.open("wb") as sink:
        launcher = subprocess.Popen(
            ["bash", "-c", run],
            cwd=clone,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the test's Ctrl-C goes to it alone
        )
    tree: set[int] = set()
    try:
        installed_at = None
        while True:
            text = log.read_text(errors="replace")
            if installed_at is None and "-m devtools.devstack" in text:
                installed_at = time.monotonic()
            if "[darkroom] ready:" in text:
                break
            assert launcher.poll() is None, f"the run command exited {launcher.returncode}:\n{text[-4000:]}"
            assert time.monotonic() - started < INSTALL_AND_READY_S, text[-4000:]
            time.sleep(1)
        ready_at = time.monotonic()
        assert "RUNNING THE OFFLINE TINY MODEL" in text
        assert "a worker of model tiny is loaded and warm" in text
        tree = descendants(launcher.pid)

        asked = time.monotonic()
        answer = subprocess.run(
            ["bash", "-c", request], capture_output=True, timeout=REQUEST_S, check=True, env=env
        )
        answered = time.monotonic() - asked
        job = json.loads(answer.stdout)
        assert job["status"] == "succeeded", job
        (image,) = job["images"]
        png = subprocess.run(["curl", "-sS", image["url"]], capture_output=True, timeout=30, check=True)
        assert png.stdout[:8] == b"\x89PNG\r\n\x1a\n"
        installed = (installed_at or ready_at) - started
        print(
            f"\nfirst run: install {installed:.0f}s, install to ready {ready_at - started:.0f}s, "
            f"ready after install {ready_at - (installed_at or started):.0f}s, request {answered:.1f}s "
            f"(port {port})"
        )
        assert not (clone / ".venv" / "bin" / "pytest").exists(), "make run installed the dev toolchain"
    finally:
        tree |= descendants(launcher.pid)
        os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the whole foreground group
        try:
            code = launcher.wait(timeout=STOP_S)
        finally:
            leftovers = {pid for pid in tree if alive(pid)}
            for pid in leftovers:  # never leave them behind, even when the test fails
                os.kill(pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert "[darkroom] stopped" in text, text[-4000:]
    assert "did not stop" not in text, text[-4000:]  # every process stopped by itself, none killed
    assert code in (0, 2, -signal.SIGINT), (code, text[-4000:])  # make reports an interrupted recipe
    assert leftovers == set(), f"still running after Ctrl-C: {leftovers}"
    assert port_free(port), f"port {port} still taken after Ctrl-C"
