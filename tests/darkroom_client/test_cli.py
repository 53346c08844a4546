"""The ``darkroom`` CLI as a user runs it: a subprocess against the running stack, reading stdout and stderr.

Argument errors and an unreachable server need no stack; they run in-process through ``main``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from darkroom_client import DarkroomClient
from darkroom_client.cli import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE, main
from services.net import free_port
from tests.darkroom_client.conftest import SMALL, TERMINAL
from tests.fixtures.signals import default_sigint
from tests.fixtures.stack import ROOT, Stack

CLI_TIMEOUT_S = 90.0


def _env() -> dict[str, str]:
    # The test decides the server; a developer's own DARKROOM_URL / DARKROOM_API_KEY must not leak in.
    return {k: v for k, v in os.environ.items() if k not in ("DARKROOM_URL", "DARKROOM_API_KEY")}


class CliRun:
    """A running ``darkroom`` process whose stderr can be awaited line by line (no sleeping, no polling)."""

    def __init__(self, stack: Stack, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "darkroom_client", *args, "--server", stack.api_url],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,  # the Ctrl-C test needs SIGINT to reach the CLI
        )
        self.stderr_lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.stderr_lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.stderr_lines.append("")  # EOF marker
            self._changed.notify_all()

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def wait_for_stderr(self, text: str, timeout: float = CLI_TIMEOUT_S) -> None:
        def seen() -> bool:
            return text in self.stderr or (bool(self.stderr_lines) and self.stderr_lines[-1] == "")

        with self._changed:
            self._changed.wait_for(seen, timeout=timeout)
        assert text in self.stderr, f"{text!r} never appeared on stderr:\n{self.stderr}"

    def finish(self, timeout: float = CLI_TIMEOUT_S) -> tuple[int, str, str]:
        assert self.process.stdout is not None
        stdout = self.process.stdout.read()
        returncode = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return returncode, stdout, self.stderr


def darkroom(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "darkroom_client", *args, "--server", stack.api_url],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def test_generate_shows_queue_position_then_steps_and_saves_verified_images(
    client_stack: Stack, client: DarkroomClient, blocker: str, tmp_path: Path
) -> None:
    run = CliRun(
        client_stack,
        "generate",
        "a red fox in the snow",
        *("--width", "512", "--height", "512", "--steps", "3", "--seed", "42", "--num-images", "2"),
        *("-o", str(tmp_path / "fox.png")),
    )
    run.wait_for_stderr("queued, position 1")
    client.cancel(blocker)  # frees the worker: the CLI's job runs next
    returncode, stdout, stderr = run.finish()

    assert returncode == 0, stderr
    assert "[########################] 3/3 steps" in stderr
    assert stderr.index("queued, position 1") < stderr.index("1/3 steps") < stderr.index("3/3 steps")
    summary = json.loads(stdout)
    assert summary["status"] == "succeeded" and summary["seed"] == 42
    entries = summary["images"]
    assert [Path(entry["path"]) for entry in entries] == [tmp_path / "fox.png", tmp_path / "fox-1.png"]
    assert [entry["seed"] for entry in entries] == [42, 43]
    job = client.get(summary["id"])
    for entry, image in zip(entries, job.images, strict=True):
        data = Path(entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] == image.sha256
        assert entry["sha256_verified"] is True and entry["bytes"] == len(data)
        with Image.open(io.BytesIO(data)) as decoded:
            assert (decoded.format, decoded.size) == ("PNG", (512, 512))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-1.png", "fox.png"]  # no partial files left


def test_ctrl_c_cancels_the_job_on_the_server(client_stack: Stack, tmp_path: Path) -> None:
    run = CliRun(
        client_stack,
        *("generate", "a long exposure", "--width", "512", "--height", "512", "--steps", "100"),
        *("-o", str(tmp_path / "never.png")),
    )
    run.wait_for_stderr("steps")  # it is running on the worker
    run.process.send_signal(signal.SIGINT)
    returncode, stdout, stderr = run.finish()

    assert returncode == EXIT_INTERRUPTED, stderr
    match = re.search(r"gen_[0-9a-f]+", stderr)
    assert match, stderr
    assert f"interrupted; cancel requested: {match.group(0)}" in stderr
    job = client_stack.wait_for(match.group(0), TERMINAL, timeout=30)
    assert job["status"] == "canceled" and job["progress"]["step"] < 100
    assert stdout == "" and not list(tmp_path.iterdir())


def test_status_and_cancel_commands(client_stack: Stack, client: DarkroomClient, blocker: str) -> None:
    queued = client.generate(SMALL)

    status = darkroom(client_stack, "status", queued.id)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["id"], shown["status"], shown["queue_position"]) == (queued.id, "queued", 1)

    canceled = darkroom(client_stack, "cancel", queued.id)
    assert canceled.returncode == 0, canceled.stderr
    assert json.loads(canceled.stdout)["status"] == "canceled"

    again = darkroom(client_stack, "cancel", queued.id)
    assert again.returncode == EXIT_USAGE and again.stdout == ""
    assert "409 job_already_finished" in again.stderr

    missing = darkroom(client_stack, "status", "gen_missing")
    assert missing.returncode == EXIT_USAGE
    assert "404 not_found" in missing.stderr


def test_a_failed_job_exits_1_with_its_error(
    client_stack: Stack, client: DarkroomClient, blocker: str, tmp_path: Path
) -> None:
    """Canceling the job from elsewhere is the one failure the tiny model can be made to have."""
    run = CliRun(
        client_stack,
        *("generate", "doomed", "--width", "512", "--height", "512", "--steps", "2"),
        *("-o", str(tmp_path / "doomed.png")),
    )
    run.wait_for_stderr("queued, position 1")
    match = re.search(r"gen_[0-9a-f]+", run.stderr)
    assert match
    client.cancel(match.group(0))
    returncode, stdout, stderr = run.finish()

    assert returncode == EXIT_JOB_FAILED, stderr
    assert f"job {match.group(0)} canceled: canceled: canceled while queued" in stderr
    summary = json.loads(stdout)
    assert summary["status"] == "canceled" and summary["images"] == []
    assert summary["error"] == {"type": "canceled", "message": "canceled while queued"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "500", "--height", "512"], "width (--width): width 500 is not a multiple of 16"),
        (["--width", "512"], "width and height must be given together"),
        (["--format", "jpeg", "-o", "fox.png"], "-o fox.png does not match --format jpeg"),
        (["--init-image", "/nonexistent/fox.png"], "--init-image: No such file or directory"),
        (["--strength", "0.5"], "strength (--strength): strength applies to image-to-image only"),
    ],
)
def test_bad_arguments_exit_2_before_anything_is_sent(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No server listens there: a request would fail with exit 3, so exit 2 proves nothing was sent.
    server = f"http://127.0.0.1:{free_port()}"
    assert main(["generate", "a fox", *args, "--server", server]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_an_unreachable_server_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "gen_x", "--server", server]) == EXIT_UNAVAILABLE
    assert f"cannot talk to {server}" in capsys.readouterr().err
