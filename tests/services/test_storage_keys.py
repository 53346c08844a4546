"""Key validation and the generated-image key layout: the rules every backend relies on."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.storage import InvalidKey, image_key, validate_key
from services.storage.keys import normalize_prefix

CREATED = datetime(2026, 11, 22, 13, 45, tzinfo=UTC)


def test_image_key_is_date_partitioned_and_grouped_by_job() -> None:
    assert image_key("job_01HXYZ-a", 3, "png", CREATED) == "generations/2026/11/22/job_01HXYZ-a/3.png"


def test_image_key_partitions_by_utc_date() -> None:
    # 01:30 on the 23rd in UTC+2 is still the 22nd in UTC: all workers must agree on one calendar.
    created = datetime(2026, 11, 23, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert image_key("j1", 0, "webp", created).startswith("generations/2026/11/22/j1/")


def test_image_key_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        image_key("j1", 0, "png", datetime(2026, 11, 22))


@pytest.mark.parametrize(
    "job_id", ["", "../etc", "a/b", "a b", "-leading", "_leading", "a.b", "x" * 129, "é"]
)
def test_image_key_refuses_unsafe_job_ids(job_id: str) -> None:
    with pytest.raises(InvalidKey, match="job id"):
        image_key(job_id, 0, "png", CREATED)


@pytest.mark.parametrize("index", [-1, True, 1.0])
def test_image_key_refuses_bad_indexes(index: object) -> None:
    with pytest.raises(InvalidKey, match="index"):
        image_key("j1", index, "png", CREATED)  # type: ignore[arg-type]


@pytest.mark.parametrize("extension", ["", ".png", "PNG", "p/ng", "png\x00", "toolongext"])
def test_image_key_refuses_bad_extensions(extension: str) -> None:
    with pytest.raises(InvalidKey, match="extension"):
        image_key("j1", 0, extension, CREATED)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "..",
        "../x",
        "a/../b",
        "a/..",
        "a//b",
        "a/./b",
        "a/",
        "a\x00b",
        "a\nb",
        "a\\b",
        "k" * 1025,
    ],
)
def test_validate_key_refuses_traversal_and_oddities(key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)


@pytest.mark.parametrize("key", ["a", "a/b.png", "a..b/c", ".hidden/x", "generations/2026/11/22/j/0.png"])
def test_validate_key_accepts_plain_relative_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(("prefix", "normalized"), [("", ""), ("/", ""), ("a", "a/"), ("/a/b/", "a/b/")])
def test_normalize_prefix(prefix: str, normalized: str) -> None:
    assert normalize_prefix(prefix) == normalized


def test_normalize_prefix_refuses_traversal() -> None:
    with pytest.raises(InvalidKey):
        normalize_prefix("a/../b")
