"""The ``loras`` field of a generation request: names, scales, at most four, each once."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from schemas.generation import MAX_LORAS, GenerationRequest


def parse(loras: Any) -> GenerationRequest:
    return GenerationRequest(prompt="a fox", loras=loras)


def error_fields(loras: Any) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        parse(loras)
    return [".".join(str(part) for part in error["loc"]) for error in caught.value.errors()]


def test_default_is_none_and_a_scale_defaults_to_one() -> None:
    assert GenerationRequest(prompt="a fox").loras == []
    request = parse([{"name": "ink"}, {"name": "film-grain_v2.1", "scale": -0.5}])
    assert [(lora.name, lora.scale) for lora in request.loras] == [("ink", 1.0), ("film-grain_v2.1", -0.5)]


def test_the_adapter_set_is_sorted_so_the_order_sent_does_not_matter() -> None:
    one = parse([{"name": "rust", "scale": 0.3}, {"name": "ink"}])
    other = parse([{"name": "ink", "scale": 1}, {"name": "rust", "scale": 0.3}])
    assert one.adapter_set() == other.adapter_set() == (("ink", 1.0), ("rust", 0.3))
    assert one.normalized().loras == one.loras  # kept as sent in the stored request


@pytest.mark.parametrize(
    ("loras", "field"),
    [
        ([{"name": "ink", "scale": 2.5}], "loras.0.scale"),
        ([{"name": "ink", "scale": -3}], "loras.0.scale"),
        ([{"name": "ink", "scale": "1"}], "loras.0.scale"),
        ([{"name": "ink", "scale": True}], "loras.0.scale"),
        ([{"name": "ink", "scale": float("nan")}], "loras.0.scale"),
        ([{"name": "ink"}, {"name": ""}], "loras.1.name"),
        ([{"name": "../etc/passwd"}], "loras.0.name"),
        ([{"name": "ink", "weight": 1}], "loras.0.weight"),
        ([{"scale": 1}], "loras.0.name"),
        ("ink", "loras"),
    ],
)
def test_bad_entries_name_their_field(loras: Any, field: str) -> None:
    assert error_fields(loras) == [field]


def test_each_name_once_and_at_most_four() -> None:
    with pytest.raises(ValidationError, match="repeated: ink"):
        parse([{"name": "ink"}, {"name": "rust"}, {"name": "ink", "scale": 0.5}])
    assert error_fields([{"name": f"l{i}"} for i in range(MAX_LORAS + 1)]) == ["loras"]
    assert len(parse([{"name": f"l{i}"} for i in range(MAX_LORAS)]).loras) == MAX_LORAS
