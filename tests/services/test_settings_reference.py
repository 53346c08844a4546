"""The configuration reference is generated from ``Settings`` and cannot drift from it.

Change, add or remove a setting without ``python -m services.settings_reference`` and the drift test fails,
so ``docs/operate/configuration.md`` and the code never disagree.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.settings import Settings
from services.settings_reference import DEFAULT_PATH, env_names, main, render


def test_the_committed_reference_is_the_generated_one() -> None:
    assert DEFAULT_PATH.read_text(encoding="utf-8") == render(), (
        "docs/operate/configuration.md is stale: run `python -m services.settings_reference` and commit it"
    )


def test_every_setting_is_described_and_listed_under_its_variable() -> None:
    text = render()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"
        assert f"`{env_names(name, field)[0]}`" in text


def test_deprecated_names_are_listed_beside_the_current_one() -> None:
    assert "`DARKROOM_COALESCE_MAX` (also read: `DARKROOM_MAX_BATCH_SIZE`)" in render()


def test_check_mode_reports_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n", encoding="utf-8")
    assert main(["--check", "--output", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--output", str(stale)]) == 0
    assert main(["--check", "--output", str(stale)]) == 0
