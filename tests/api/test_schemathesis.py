"""schemathesis against the live API: every operation of the served OpenAPI document, schema-valid and
schema-invalid input, at least 1,000 generated requests in all.

Checks on every response: no 5xx; the status code, content type, headers and body are the ones the spec
declares for that operation; and input that breaks the schema is refused with a 4xx. The app runs under
uvicorn on the test Redis with no worker, so accepted jobs just wait in the queue; a second pass runs the
job operations against ids that exist, so their 200/202/409 answers and the event stream are checked too.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.main import create_app
from services.api_keys import hash_key
from services.settings import Settings
from tests.api import serve
from tests.fixtures.stack import TEST_WEBHOOK_SECRET

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_RUN = 110  # per operation and mode; operations without parameters have far fewer cases
MIN_CASES = 1_000
TIME_BUDGET_S = 120.0
API_KEY = "dk_schemathesis_test_key"
OPENAI_IMAGES = "POST /v1/images/generations"


@pytest.fixture
def live_url(redis_url: str, tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path / 'outputs'}",
        api_keys=f"schemathesis:sha256:{hash_key(API_KEY)}",  # with auth on, a missing key must be a 401
        rate_limit_per_minute=0,  # limits would answer 429 before most of the request is looked at
        max_wait=1,  # a generated 'Prefer: wait=N' would otherwise hold each case for up to a minute
        openai_images_wait=0.05,  # likewise every accepted OpenAI-style request, which always waits
        webhook_secret=TEST_WEBHOOK_SECRET,  # so webhook URLs go through the SSRF checks, not a flat 422
    )
    with serve(create_app(settings), lifespan="on") as url:
        yield url


def run_cases(
    strategy: st.SearchStrategy[Any], call: Callable[[Any], None], max_examples: int = EXAMPLES_PER_RUN
) -> None:
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,  # the same cases every run is not the point; a failure prints its reproduction
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failing case is reported as found
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        call(case)

    run()


def test_every_operation_conforms_to_the_live_spec_and_never_answers_5xx(live_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")

    @schema.auth()
    class BearerKey:
        """The valid key on every case, except those where schemathesis drops the credentials on purpose."""

        def get(self, case: Any, context: Any) -> str:
            return API_KEY

        def set(self, case: Any, data: str, context: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 16, [op.label for op in operations]  # HEAD /v1/files/{key} included
    deadline = time.monotonic() + TIME_BUDGET_S
    counts: Counter[str] = Counter()
    statuses: Counter[tuple[str, int]] = Counter()
    session = requests.Session()

    def checker(label: str, mode: GenerationMode) -> Callable[[Any], None]:
        checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
        if label == OPENAI_IMAGES:  # with no worker, an accepted request ends in its documented 504
            checks = [check for check in checks if check is not not_a_server_error]

        def call(case: Any) -> None:
            assert time.monotonic() < deadline, f"over the {TIME_BUDGET_S}s budget"
            response = case.call(base_url=live_url, session=session, timeout=30)
            counts[label] += 1
            statuses[(label, response.status_code)] += 1
            if label == OPENAI_IMAGES and response.status_code >= 500:
                assert response.status_code == 504, response.text
                assert response.json()["code"] == "generation_timeout", response.text
            case.validate_response(response, checks=checks)

        return call

    for operation in operations:
        for mode in GenerationMode:
            if mode is GenerationMode.NEGATIVE and not has_inputs(operation):
                continue  # /healthz, /readyz, /metrics, GET /v1/models: nothing to break but the key
            run_cases(operation.as_strategy(generation_mode=mode), checker(operation.label, mode))

    # An existing job: GET reads a real Job, cancel answers 200 and then 409, and once the job is over its
    # event stream is finite. Last-Event-ID is pinned to the start: resuming *after* the terminal event
    # would wait for events that never come (see test_hostile_input for that header's odd values).
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=live_url, headers=auth, timeout=10) as client:
        body = {"prompt": "a fox", "width": 512, "height": 512}
        job_id = client.post("/v1/generations", json=body).json()["id"]
    by_id = {op.definition.raw.get("operationId"): op for op in operations}
    for operation_id in ("getGeneration", "cancelGeneration", "getGeneration", "streamGenerationEvents"):
        operation = by_id[operation_id]
        headers = {"Last-Event-ID": "0"} if operation_id == "streamGenerationEvents" else None
        strategy = operation.as_strategy(path_parameters={"job_id": job_id}, headers=headers)
        run_cases(strategy, checker(f"{operation.label} (existing job)", GenerationMode.POSITIVE), 20)
    # An existing batch likewise: read (with generated offset/limit), canceled (200, then 409), read again.
    with httpx.Client(base_url=live_url, headers=auth, timeout=10) as client:
        batch_id = client.post("/v1/batches", json={"template": body, "count": 3}).json()["id"]
    for operation_id in ("getBatch", "cancelBatch", "getBatch"):
        operation = by_id[operation_id]
        strategy = operation.as_strategy(path_parameters={"batch_id": batch_id})
        run_cases(strategy, checker(f"{operation.label} (existing batch)", GenerationMode.POSITIVE), 20)

    total = sum(counts.values())
    summary = "\n".join(f"{label}: {count}" for label, count in sorted(counts.items()))
    assert total >= MIN_CASES, f"only {total} cases:\n{summary}"
    assert all(status < 500 or (label, status) == (OPENAI_IMAGES, 504) for label, status in statuses), (
        statuses
    )
    # The job operations really reached their success answers, not only their errors.
    for label, status in [
        ("POST /v1/generations", 202),
        (OPENAI_IMAGES, 504),  # accepted and queued, but no worker to finish it
        ("GET /v1/generations/{job_id} (existing job)", 200),
        ("POST /v1/generations/{job_id}/cancel (existing job)", 200),
        ("POST /v1/generations/{job_id}/cancel (existing job)", 409),
        ("GET /v1/generations/{job_id}/events (existing job)", 200),
        ("GET /v1/batches/{batch_id} (existing batch)", 200),
        ("POST /v1/batches/{batch_id}/cancel (existing batch)", 200),
        ("POST /v1/batches/{batch_id}/cancel (existing batch)", 409),
    ]:
        assert statuses[(label, status)], (label, status, statuses)
    print(f"schemathesis: {total} cases\n{summary}\n{sorted(statuses.items())}")


def has_inputs(operation: Any) -> bool:
    raw = operation.definition.raw
    return bool(raw.get("parameters") or raw.get("requestBody"))
