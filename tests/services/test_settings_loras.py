"""DARKROOM_LORAS: the LoRA allow-list, as JSON or name=source pairs, checked at start-up."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.settings import Settings


def from_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(f"DARKROOM_{name}", value)
    return Settings()


def test_json_object_or_name_source_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert from_env(monkeypatch).loras == {}
    pairs = from_env(monkeypatch, LORAS=" ink=/models/ink.safetensors,\n rust = owner/sd35-rust ")
    assert pairs.loras == {"ink": "/models/ink.safetensors", "rust": "owner/sd35-rust"}
    as_json = from_env(monkeypatch, LORAS='{"ink": "/models/ink", "a.b-c_d": "owner/repo/x.safetensors"}')
    assert as_json.loras == {"ink": "/models/ink", "a.b-c_d": "owner/repo/x.safetensors"}


@pytest.mark.parametrize(
    "value",
    ["ink", "ink=", "bad name=/x", '{"ink": ""}', '{"ink": 3}', "=/models/x", '{"ink": "/x"'],
)
def test_malformed_lists_fail_at_start_up(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    with pytest.raises(ValidationError, match="loras|LoRA|DARKROOM_LORAS|JSON|json"):
        from_env(monkeypatch, LORAS=value)


@pytest.mark.parametrize("switch", ["FUSE_QKV", "FP8", "COMPILE"])
def test_switches_that_would_bypass_the_adapters_cannot_be_forced_alongside(
    monkeypatch: pytest.MonkeyPatch, switch: str
) -> None:
    with pytest.raises(ValidationError, match=f"DARKROOM_{switch}=true"):
        from_env(monkeypatch, LORAS="ink=/x", **{switch: "true"})
    assert from_env(monkeypatch, LORAS="", **{switch: "true"}).loras == {}
