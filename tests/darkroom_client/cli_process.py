"""Running the ``darkroom`` CLI as a user does: a subprocess against a stack, stdout and stderr read back.

Shared by the CLI test modules; a subprocess (not ``main`` in-process) so Ctrl-C, exit codes and the split
between stdout and stderr are exactly what a shell sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

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
