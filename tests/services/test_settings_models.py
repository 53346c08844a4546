"""DARKROOM_MODEL_NAME and DARKROOM_MODELS: which model a process serves, and which ones the API accepts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.queue import batch_queue_name, generation_queue_name
from services.settings import DEFAULT_MODEL, Settings


def from_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(f"DARKROOM_{name}", value)
    return Settings()


def test_the_served_name_is_the_model_id_a_folder_name_or_the_given_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert from_env(monkeypatch).served_model == DEFAULT_MODEL
    assert Settings(model="tiny").served_model == "tiny"
    assert Settings(model="/models/sd3.5-large/").served_model == "sd3.5-large"  # not the path
    assert Settings(model="/models/x", model_name="sd3.5-large").served_model == "sd3.5-large"


def test_the_api_accepts_the_default_first_then_the_listed_models(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(monkeypatch, MODEL="tiny", MODELS=" sd3.5-large,\nowner/model , tiny")
    assert settings.accepted_models == ("tiny", "sd3.5-large", "owner/model")


def test_each_model_has_its_own_two_queues() -> None:
    settings = Settings(model="tiny")
    assert generation_queue_name(settings) == "darkroom:tiny"
    assert batch_queue_name(settings) == "darkroom-batch:tiny"
    assert generation_queue_name(settings, "owner/model") == "darkroom:owner/model"


@pytest.mark.parametrize(
    "env",
    [
        {"MODELS": "a,two words"},
        {"MODELS": "-leading-dash"},
        {"MODEL_NAME": "a:b"},  # ':' separates queue name parts
        {"MODEL": "/models/my model"},  # a folder name that is no model name: set DARKROOM_MODEL_NAME
    ],
)
def test_unusable_names_fail_at_start_up(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="model|MODEL"):
        from_env(monkeypatch, **env)
