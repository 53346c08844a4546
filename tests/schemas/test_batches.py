"""The batch body: two ways to list items, limits, and errors that name the offending item's field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from schemas.batches import MAX_BATCH_ITEMS, CreateBatch
from schemas.generation import MAX_SEED

ITEM: dict[str, Any] = {"prompt": "a fox", "width": 512, "height": 512}


def error_fields(body: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        CreateBatch.model_validate(body)
    return [".".join(str(part) for part in error["loc"]) for error in caught.value.errors()]


def test_requests_become_items_in_order() -> None:
    batch = CreateBatch.model_validate({"requests": [{**ITEM, "seed": 3}, {**ITEM, "prompt": "a hare"}]})
    items = batch.item_requests()
    assert [(i.prompt, i.seed) for i in items] == [("a fox", 3), ("a hare", None)]
    assert batch.webhook_events == ["batch.completed"] and batch.item_webhook_events() == []


def test_a_template_with_seeds_is_one_item_per_seed() -> None:
    batch = CreateBatch.model_validate({"template": ITEM, "seeds": [5, 0, MAX_SEED]})
    assert [i.seed for i in batch.item_requests()] == [5, 0, MAX_SEED]


def test_count_with_a_template_seed_gives_every_image_its_own_seed() -> None:
    batch = CreateBatch.model_validate(
        {"template": {**ITEM, "seed": MAX_SEED - 2, "num_images": 2}, "count": 3}
    )
    assert [i.seed for i in batch.item_requests()] == [MAX_SEED - 2, MAX_SEED, 1]  # wraps as image seeds do
    unseeded = CreateBatch.model_validate({"template": ITEM, "count": 2}).item_requests()
    assert [i.seed for i in unseeded] == [None, None]  # drawn per item on admission


def test_the_batch_generation_events_become_every_items_own_subscription() -> None:
    batch = CreateBatch.model_validate(
        {
            "requests": [ITEM],
            "webhook_url": "https://example.com/hook",
            "webhook_events": [
                "generation.completed",  # an alias: the three terminal events
                "batch.completed",
                "generation.started",
                "batch.completed",
                "generation.progress",
            ],
        }
    )
    terminal = ["generation.succeeded", "generation.failed", "generation.canceled"]
    assert batch.webhook_events == [*terminal, "batch.completed", "generation.started", "generation.progress"]
    assert batch.item_webhook_events() == [*terminal, "generation.started", "generation.progress"]


def test_the_item_limit_is_1000() -> None:
    assert len(CreateBatch.model_validate({"requests": [ITEM] * MAX_BATCH_ITEMS}).item_requests()) == 1000
    assert error_fields({"requests": [ITEM] * (MAX_BATCH_ITEMS + 1)}) == ["requests"]
    assert error_fields({"template": ITEM, "seeds": list(range(MAX_BATCH_ITEMS + 1))}) == ["seeds"]
    assert error_fields({"template": ITEM, "count": MAX_BATCH_ITEMS + 1}) == ["count"]


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"requests": [ITEM, {**ITEM, "width": 500}]}, ["requests.1.width"]),
        ({"requests": [ITEM, {"width": 512, "height": 512}]}, ["requests.1.prompt"]),
        ({"requests": [{**ITEM, "init_image": "aGk="}]}, ["requests.0.init_image"]),
        ({"requests": [ITEM], "template": ITEM}, ["template"]),
        ({}, ["template"]),
        ({"template": ITEM}, ["count"]),
        ({"template": ITEM, "seeds": [1], "count": 2}, ["count"]),
        ({"template": {**ITEM, "seed": 1}, "seeds": [1]}, ["seeds"]),
        ({"template": ITEM, "seeds": [1, MAX_SEED + 1, True]}, ["seeds.1", "seeds.2"]),
        ({"requests": [ITEM], "seeds": [1]}, ["seeds"]),
        ({"requests": [ITEM], "count": "2"}, ["count"]),
        ({"template": ITEM, "count": 0}, ["count"]),
        ({"requests": [ITEM], "webhook_events": []}, ["webhook_events"]),
        ({"requests": [ITEM], "webhook_events": ["batch.started"]}, ["webhook_events.0"]),
        ({"requests": [ITEM], "priority": "high"}, ["priority"]),
    ],
)
def test_errors_name_the_offending_field(body: dict[str, Any], fields: list[str]) -> None:
    assert error_fields(body) == fields
