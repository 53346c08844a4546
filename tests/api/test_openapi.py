"""The committed ``docs/openapi.json`` is the app's spec, a valid OpenAPI 3.1 document a generator can use.

The drift test is the point: change a route or a schema without ``python -m api.openapi`` and it fails,
so the published contract and the code cannot silently disagree.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from api.auth import is_open_path
from api.openapi import DEFAULT_PATH, build_spec, main, render

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
OPENAI_PROBLEM_REF = {"$ref": "#/components/schemas/OpenAICompatibleProblem"}
JOB_REF = {"$ref": "#/components/schemas/Job"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return build_spec()


def operations(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    }


def test_the_committed_spec_is_the_generated_one(spec: dict[str, Any]) -> None:
    assert DEFAULT_PATH.read_text(encoding="utf-8") == render(spec), (
        "docs/openapi.json is stale: run `python -m api.openapi` and commit the result"
    )


def test_building_the_spec_connects_nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("building the OpenAPI spec tried to open a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert build_spec()["info"]["title"] == "darkroom"


def test_it_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1.")
    validate(spec)


def test_every_operation_has_a_unique_id_tags_security_and_declares_problem_json_errors(
    spec: dict[str, Any],
) -> None:
    ids = [operation.get("operationId") for operation in operations(spec).values()]
    assert all(ids) and len(set(ids)) == len(ids), ids
    for name, operation in operations(spec).items():
        path = name.split(" ", 1)[1]
        assert operation.get("tags"), f"{name} has no tag"
        assert operation["security"] == ([] if is_open_path(path) else [{"HTTPBearer": []}]), name
        responses = operation["responses"]
        assert not {"4XX", "5XX", "default"} & set(responses), f"{name}: declare statuses, not ranges"
        if operation["security"]:
            assert "401" in responses, f"{name} needs a key but declares no 401"
        problem = OPENAI_PROBLEM_REF if path.startswith("/v1/images/") else PROBLEM_REF
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                assert response["content"] == {"application/problem+json": {"schema": problem}}, (
                    f"{name} {status}"
                )
            elif name.startswith("HEAD "):  # headers only: a HEAD response has no body to describe
                assert not response.get("content"), f"{name} {status} documents a body"
            else:
                assert response.get("content"), f"{name} {status} documents no body"


def test_the_document_names_its_servers_license_and_tags(spec: dict[str, Any]) -> None:
    assert spec["servers"] and spec["servers"][0]["variables"]["host"]["default"]
    assert spec["info"]["license"]["identifier"] == "Apache-2.0"
    declared = {tag["name"] for tag in spec["tags"]}
    used = {tag for operation in operations(spec).values() for tag in operation["tags"]}
    assert used <= declared


def test_what_the_server_always_sends_is_required(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    for name, fields in {
        "Job": {"images", "warnings", "error", "progress", "request", "webhook", "batch_id"},
        "ImageResult": {"url", "sha256", "finish_reason"},
        "Batch": {"counts", "items", "next_offset", "webhook", "cancel_requested"},
        "BatchList": {"data", "next_offset"},
        "GenerationRequest": {"seed", "num_inference_steps", "loras", "init_image"},
    }.items():
        assert fields <= set(schemas[name]["required"]), name
    # Request defaults stay optional.
    assert schemas["CreateGeneration"]["required"] == ["prompt"]
    # One schema per model: generators that name models by title refuse X-Input/X-Output pairs.
    assert not [name for name in schemas if name.endswith(("-Input", "-Output"))]


def test_limits_are_standard_keywords(spec: dict[str, Any]) -> None:
    text = json.dumps(spec)
    assert '"ge":' not in text and '"le":' not in text
    seed = spec["components"]["schemas"]["CreateGeneration"]["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (0, 2**32 - 1)
    seeds = spec["components"]["schemas"]["CreateBatch"]["properties"]["seeds"]["anyOf"][0]["items"]
    assert (seeds["minimum"], seeds["maximum"]) == (0, 2**32 - 1)


def test_image_downloads_are_binary(spec: dict[str, Any]) -> None:
    content = spec["paths"]["/v1/files/{key}"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"image/png", "image/jpeg", "image/webp"}
    assert all(media["schema"] == {"type": "string", "format": "binary"} for media in content.values())


def test_submitting_documents_202_200_and_its_headers(spec: dict[str, Any]) -> None:
    operation = spec["paths"]["/v1/generations"]["post"]
    assert operation["operationId"] == "createGeneration"
    for status in ("202", "200"):
        response = operation["responses"][status]
        assert response["content"]["application/json"]["schema"] == JOB_REF
        assert "Location" in response["headers"]
    assert "Preference-Applied" in operation["responses"]["200"]["headers"]
    headers = {p["name"].lower(): p for p in operation["parameters"] if p["in"] == "header"}
    assert set(headers) >= {"idempotency-key", "prefer"}
    assert all(header["description"] for header in headers.values())
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CreateGeneration"}


def test_check_mode_reports_drift_and_write_mode_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "openapi.json"
    assert main(["--check", "--output", str(target)]) == 1
    assert "does not exist" in capsys.readouterr().err

    assert main(["--output", str(target)]) == 0
    assert main(["--check", "--output", str(target)]) == 0

    stale = json.loads(target.read_text())
    del stale["paths"]["/v1/generations/{job_id}/cancel"]
    stale["components"]["schemas"]["Job"]["properties"].pop("warnings")
    target.write_text(render(stale))
    assert main(["--check", "--output", str(target)]) == 1
    report = capsys.readouterr().err
    assert "+ operation POST /v1/generations/{job_id}/cancel (new in code)" in report
    assert "~ schema Job changed" in report
    assert "--- committed" in report and "+++ generated" in report
