"""The prompt blocklist and the classifier loader: matching rules, configuration, start-up errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.content_safety import (
    ContentSafetyConfigError,
    PromptFilter,
    Verdict,
    load_classifier,
    normalize,
)
from services.settings import Settings


def blocks(entries: list[str], text: str) -> bool:
    return PromptFilter.from_entries(entries).first_match(text) is not None


def test_normalize_folds_case_width_ligatures_and_drops_invisible_characters() -> None:
    assert normalize("ＮＳＦＷ") == "nsfw"  # full-width letters
    assert normalize("Straße") == "strasse"  # case folding, not just lower()
    assert normalize("ﬁlth") == "filth"  # ligature
    assert normalize("n\u200bs\u00adf\u200dw") == "nsfw"  # zero-width space, soft hyphen, joiner


@pytest.mark.parametrize(
    "text",
    ["NSFW art", "a Nsfw picture", "ｎｓｆｗ", "n\u200bsfw", "(nsfw)", "nsfw_style", "tag:nsfw!", "x nsfw"],
)
def test_a_term_is_matched_in_any_case_width_or_disguise(text: str) -> None:
    assert blocks(["nsfw"], text)


@pytest.mark.parametrize("text", ["class", "assumption", "a bass guitar", "passage", "grass"])
def test_a_term_matches_whole_words_only(text: str) -> None:
    assert not blocks(["ass"], text)


def test_phrases_match_across_spaces_and_punctuation_but_not_fused() -> None:
    assert blocks(["x rated"], "an X-Rated film")
    assert blocks(["x-rated"], "an x   rated film")
    assert blocks(["x-rated"], "x_rated")
    assert not blocks(["x-rated"], "xrated")
    assert not blocks(["x rated"], "x")


def test_entries_are_normalised_too_and_non_latin_words_have_boundaries() -> None:
    assert blocks(["ＢＡＤ"], "so bad")
    assert blocks(["Straße"], "STRASSE")
    assert blocks(["гадость"], "это ГАДОСТЬ!")
    assert not blocks(["гадость"], "гадостью")  # a longer word, not the term


def test_regex_entries_search_the_normalised_text() -> None:
    pattern = ["re:\\bk[i1]ll\\s+(him|her)\\b"]
    assert blocks(pattern, "K1LL   HER now")
    assert blocks(pattern, "ｋｉｌｌ him")
    assert not blocks(pattern, "skill him")


def test_an_empty_filter_passes_everything() -> None:
    empty = PromptFilter.from_entries(["", "  "])
    assert not empty.enabled
    assert empty.first_match("anything at all") is None


def test_negative_prompt_is_checked_only_when_configured() -> None:
    fields = {"prompt": "a red fox", "negative_prompt": "nsfw, blurry"}
    assert PromptFilter.from_entries(["nsfw"]).blocked_field(fields) is None
    checking = PromptFilter.from_entries(["nsfw"], check_negative_prompt=True)
    assert checking.blocked_field(fields) == ("negative_prompt", "nsfw")
    assert checking.blocked_field({"prompt": "NSFW fox", "negative_prompt": None}) == ("prompt", "nsfw")


def test_settings_combine_the_variable_and_the_file(tmp_path: Path) -> None:
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# one entry a line; commas belong to the entry\nre:gore{2,}\n\n  bloodbath  \n")
    settings = Settings(prompt_blocklist="nsfw,\nx rated", prompt_blocklist_file=blocklist)
    prompt_filter = PromptFilter.from_settings(settings)
    assert prompt_filter.size == 4
    for text in ("NSFW", "x-rated", "goreee", "a Bloodbath"):
        assert prompt_filter.first_match(text) is not None, text
    assert prompt_filter.first_match("a red fox in the snow") is None


@pytest.mark.parametrize(
    ("entries", "message"),
    [(["re:(unclosed"], "regex"), (["--"], "no letters or digits")],
)
def test_a_bad_entry_is_a_start_up_error(entries: list[str], message: str) -> None:
    with pytest.raises(ContentSafetyConfigError, match=message):
        PromptFilter.from_entries(entries)


def test_a_missing_blocklist_file_is_a_start_up_error(tmp_path: Path) -> None:
    settings = Settings(prompt_blocklist_file=tmp_path / "absent.txt")
    with pytest.raises(ContentSafetyConfigError, match="DARKROOM_PROMPT_BLOCKLIST_FILE"):
        PromptFilter.from_settings(settings)


def test_the_api_refuses_to_start_with_a_bad_blocklist(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app

    settings = Settings(
        auth_disabled=True,
        storage_url=f"file://{tmp_path}",
        prompt_blocklist="re:[unclosed",
        redis_url="redis://127.0.0.1:1/0",
    )
    with pytest.raises(ContentSafetyConfigError), TestClient(create_app(settings)):
        pass


def keep_everything(image: object, request: object, index: int) -> Verdict:
    return Verdict(True)


class Holder:
    check = staticmethod(keep_everything)


NOT_CALLABLE = 42


def test_the_classifier_is_loaded_from_a_dotted_path() -> None:
    assert load_classifier(f"{__name__}:keep_everything") is keep_everything
    assert load_classifier(f"{__name__}:Holder.check") is keep_everything


@pytest.mark.parametrize(
    "path",
    [f"{__name__}:absent", "no_such_module_xyz:check", f"{__name__}:NOT_CALLABLE", "no-colon"],
)
def test_an_unloadable_classifier_is_a_start_up_error(path: str) -> None:
    with pytest.raises(ContentSafetyConfigError, match="DARKROOM_IMAGE_CLASSIFIER"):
        load_classifier(path)


def test_the_classifier_setting_must_look_like_a_dotted_path() -> None:
    with pytest.raises(ValueError, match="image_classifier"):
        Settings(image_classifier="os.system('rm')")
