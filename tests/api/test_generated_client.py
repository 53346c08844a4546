"""docs/openapi.json as an integrator meets it: generate a Python client with openapi-python-client, type
check a script written against it with ``mypy --strict``, and run that script against a live API with keys
on (submit, wait, download and check the image's sha256, a batch, the models, a 422 decoded as Problem).

The generator's settings are the ones docs/client.md tells users to pass (docs/openapi-python-client.yaml),
and its output must carry no warning: a warning is an operation or response it dropped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.openapi import DEFAULT_PATH
from tests.fixtures.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
USAGE = Path(__file__).with_name("generated_client_usage.py")
GENERATOR_CONFIG = ROOT / "docs" / "openapi-python-client.yaml"
PACKAGE = "darkroom_api_client"
API_KEY = "dk_generated_client_test_key"
BIN = Path(sys.executable).parent
# Strict for the script; the generator's own modules are its authors' to type-check, not ours.
MYPY_CONFIG = f"""[mypy]
strict = True
[mypy-{PACKAGE}.*]
ignore_errors = True
"""


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding the generated package (its post-generation hooks run ruff, from our venv)."""
    out = tmp_path_factory.mktemp("generated-client")
    result = subprocess.run(
        [
            str(BIN / "openapi-python-client"),
            "generate",
            "--path",
            str(DEFAULT_PATH),
            "--config",
            str(GENERATOR_CONFIG),
            "--meta",
            "none",
            "--output-path",
            str(out / PACKAGE),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower() and "skipping" not in output.lower(), output
    return out


@pytest.fixture
def keyed_stack(tmp_path: Path, shared_backend: Stack) -> Iterator[Stack]:
    shared_backend.wait_idle()
    with Stack(tmp_path, backend=shared_backend, api_keys={"integrator": API_KEY}) as stack:
        yield stack


def test_the_generated_package_has_every_operation(generated: Path) -> None:
    modules = {path.stem for path in (generated / PACKAGE / "api").rglob("*.py")} - {"__init__"}
    assert {
        "create_generation",
        "get_generation",
        "cancel_generation",
        "stream_generation_events",
        "create_batch",
        "list_batches",
        "get_batch",
        "cancel_batch",
        "create_image",
        "list_models",
        "retrieve_model",
        "download_file",
    } <= modules


def test_a_script_on_the_generated_client_passes_mypy_strict(generated: Path, tmp_path: Path) -> None:
    config = tmp_path / "mypy.ini"
    config.write_text(MYPY_CONFIG)
    script = tmp_path / USAGE.name  # checked alone, as an integrator's file (not as part of tests.api)
    script.write_text(USAGE.read_text())
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-incremental", str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(generated)},
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_script_runs_against_a_live_api_with_keys_on(generated: Path, keyed_stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, str(USAGE), keyed_stack.api_url, API_KEY],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(generated)},
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
