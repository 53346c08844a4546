"""Model routing against a real fleet: one API fronting two models, each served by its own worker process.

The second model is the tiny model with its transformer's output layer negated (built offline, loaded
through the same ``from_pretrained`` path from a local folder under its own ``DARKROOM_MODEL_NAME``), so
the same request draws different pixels on the two models — which is how these tests tell who drew what.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis
from PIL import Image
from safetensors.torch import load_file, save_file

from api.main import create_app
from services.settings import DEFAULT_MODEL, Settings
from tests.api import serve
from tests.fixtures.stack import Stack, api_stack, stop_process

OTHER = "tiny-negated"
FAST: dict[str, Any] = {
    "prompt": "a lighthouse",
    "seed": 7,
    "width": 512,
    "height": 512,
    "num_inference_steps": 2,
}
READY_S = 120.0


def negated_tiny_model(source: Path, target: Path) -> Path:
    """A copy of the tiny model whose transformer draws differently: ``proj_out`` weights negated."""
    shutil.copytree(source, target)
    weights = target / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    changed = {name: -tensor if name.startswith("proj_out.") else tensor for name, tensor in tensors.items()}
    assert any(name.startswith("proj_out.") for name in tensors)
    save_file(changed, weights, metadata={"format": "pt"})
    return target


def start_worker(stack: Stack, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    stack.start_worker(name, {"OMP_NUM_THREADS": "1", **env})
    return stack.processes[name]


def models(client: httpx.Client) -> dict[str, dict[str, Any]]:
    answer = client.get("/v1/models")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list"
    return {entry["id"]: entry for entry in body["data"]}


def wait_for_ready(client: httpx.Client, model: str, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + READY_S
    while True:
        entry = models(client)[model]
        if entry["ready_workers"] == count:
            return entry
        assert time.monotonic() < deadline, f"{model}: {entry['ready_workers']} ready, wanted {count}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def other_worker_env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, str]:
    """What a worker of OTHER is started with: the negated model's folder, served under OTHER."""
    folder = negated_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("models") / "negated")
    return {"DARKROOM_MODEL": str(folder), "DARKROOM_MODEL_NAME": OTHER}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, shared_backend: Stack, other_worker_env: dict[str, str]
) -> Iterator[Stack]:
    """API serving "tiny" (the default) and OTHER; one worker for each: the shared backend's for "tiny",
    one of the module's own for OTHER (stopped with the module's stack)."""
    stacks = api_stack(shared_backend, tmp_path_factory.mktemp("stack-models"), {"DARKROOM_MODELS": OTHER})
    stack = next(stacks)
    try:
        start_worker(stack, "worker-other", other_worker_env)
        with stack.client() as client:
            wait_for_ready(client, OTHER, 1)
        yield stack
    finally:
        stacks.close()


def generate(stack: Stack, client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    created = client.post("/v1/generations", json=body)
    assert created.status_code == 202, created.text
    return stack.wait_for(created.json()["id"], {"succeeded", "failed", "canceled"})


def image_digest(client: httpx.Client, job: dict[str, Any]) -> str:
    assert job["status"] == "succeeded", job
    (image,) = job["images"]
    data = client.get(image["url"]).content
    assert hashlib.sha256(data).hexdigest() == image["sha256"]
    return image["sha256"]


def pixels(client: httpx.Client, job: dict[str, Any]) -> np.ndarray:
    assert job["status"] == "succeeded", job
    (image,) = job["images"]
    return np.asarray(Image.open(io.BytesIO(client.get(image["url"]).content)).convert("RGB"), dtype=np.int16)


def test_the_models_list_names_every_served_model_with_its_ready_workers(stack: Stack) -> None:
    with stack.client() as client:
        listed = models(client)
        assert list(listed) == ["tiny", OTHER]  # the default first
        assert listed["tiny"]["default"] is True and listed[OTHER]["default"] is False
        for entry in listed.values():
            assert entry["object"] == "model" and entry["owned_by"] == "darkroom"
            assert entry["ready_workers"] == 1 and entry["queued"] == 0 and entry["batch_queued"] == 0
            assert entry["created"] > 0  # when a worker first served it
        one = client.get(f"/v1/models/{OTHER}")
        assert one.status_code == 200 and one.json() == listed[OTHER]
        missing = client.get("/v1/models/stabilityai/stable-diffusion-3.5-large")
        assert missing.status_code == 404 and missing.json()["code"] == "model_not_found"
    # The official SDK reads the list (OpenAI's shape).
    sdk = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", timeout=30)
    assert [model.id for model in sdk.models.list()] == ["tiny", OTHER]
    assert sdk.models.retrieve(OTHER).id == OTHER


def test_each_job_is_drawn_by_the_model_it_names(stack: Stack) -> None:
    with stack.client() as client:
        default = generate(stack, client, FAST)
        named_default = generate(stack, client, {**FAST, "model": "tiny"})
        other = generate(stack, client, {**FAST, "model": OTHER})
        other_again = generate(stack, client, {**FAST, "model": OTHER})
        assert default["request"]["model"] == "tiny"  # the default is written into the job
        assert other["request"]["model"] == OTHER
        # Same request, same model: same pixels; other model: other pixels.
        assert image_digest(client, default) == image_digest(client, named_default)
        assert image_digest(client, other) == image_digest(client, other_again)
        assert image_digest(client, other) != image_digest(client, default)


def test_an_unknown_model_is_a_422_naming_the_field_and_queues_nothing(stack: Stack) -> None:
    with stack.client() as client:
        refused = client.post(
            "/v1/generations", json={**FAST, "model": "stabilityai/stable-diffusion-3.5-large"}
        )
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        problem = refused.json()
        assert problem["code"] == "model_not_found"
        assert [error["field"] for error in problem["errors"]] == ["model"]
        assert "tiny" in problem["detail"] and OTHER in problem["detail"]
        malformed = client.post("/v1/generations", json={**FAST, "model": "two words"})
        assert malformed.status_code == 422 and malformed.json()["errors"][0]["field"] == "model"
        assert all(entry["queued"] == 0 for entry in models(client).values())


def test_a_batch_runs_on_its_model_and_may_not_mix_models(stack: Stack) -> None:
    with stack.client() as client:
        mixed = client.post(
            "/v1/batches", json={"requests": [{**FAST, "model": OTHER}, FAST, {**FAST, "model": "tiny"}]}
        )
        assert mixed.status_code == 422, mixed.text
        assert mixed.json()["code"] == "mixed_models"
        assert [error["field"] for error in mixed.json()["errors"]] == ["requests.2.model"]
        unknown = client.post("/v1/batches", json={"template": {**FAST, "model": "nope"}, "count": 2})
        assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "template.model"

        template = {**{k: v for k, v in FAST.items() if k != "seed"}, "model": OTHER}
        created = client.post("/v1/batches", json={"template": template, "seeds": [7, 8]})
        assert created.status_code == 202, created.text
        batch_id = created.json()["id"]
        assert created.json()["model"] == OTHER
        deadline = time.monotonic() + 60
        while (batch := client.get(f"/v1/batches/{batch_id}").json())["status"] != "completed":
            assert time.monotonic() < deadline, batch
            time.sleep(0.1)
        assert batch["counts"]["succeeded"] == 2, batch
        first = batch["items"][0]["id"]
        job = client.get(f"/v1/generations/{first}").json()
        assert job["request"]["model"] == OTHER
        # Seed 7 on the other model: the single job's pixels there (up to the 2 levels coalescing may
        # move a pixel by: the two items ran as one pipeline call), and nothing like the default model's.
        drawn = pixels(client, job)
        assert np.abs(drawn - pixels(client, generate(stack, client, {**FAST, "model": OTHER}))).max() <= 2
        assert np.abs(drawn - pixels(client, generate(stack, client, FAST))).mean() > 10


def test_the_openai_endpoint_routes_by_model_too(stack: Stack) -> None:
    sdk = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", timeout=60)
    extra = {"seed": 7, "num_inference_steps": 2}
    with stack.client() as client:
        reference = image_digest(client, generate(stack, client, FAST))
        reference_other = image_digest(client, generate(stack, client, {**FAST, "model": OTHER}))
    drawn = {
        model: sdk.images.generate(prompt=FAST["prompt"], model=model, size="512x512", extra_body=extra)
        for model in ("sd3.5-medium", OTHER)  # our alias names the default model
    }
    with stack.client() as client:
        for model, expected in (("sd3.5-medium", reference), (OTHER, reference_other)):
            job_id = (drawn[model].model_extra or {})["id"]
            job = client.get(f"/v1/generations/{job_id}").json()
            assert image_digest(client, job) == expected, model
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.images.generate(prompt="x", model="dall-e-3", extra_body=extra)
    assert refused.value.code == "model_not_found"


def test_jobs_for_a_model_without_workers_wait_for_one_and_no_other_model_takes_them(
    stack: Stack, other_worker_env: dict[str, str]
) -> None:
    """Last in the module: it stops the other model's worker, then starts a fresh one."""
    with stack.client() as client:
        assert stop_process(stack.processes["worker-other"]) == 0  # warm shutdown: it withdraws at once
        assert models(client)[OTHER]["ready_workers"] == 0
        waiting = client.post("/v1/generations", json={**FAST, "model": OTHER}).json()["id"]
        served = generate(stack, client, FAST)  # the default model's worker is idle and takes its own only
        assert served["status"] == "succeeded"
        job = client.get(f"/v1/generations/{waiting}").json()
        assert job["status"] == "queued" and job["queue_position"] == 1
        assert models(client)[OTHER]["queued"] == 1
        # The autoscaling signal (deploy/k8s): each model's backlog under its own label.
        exported = client.get("/metrics").text
        assert f'darkroom_queue_depth{{model="{OTHER}",queue="darkroom:{OTHER}"}} 1.0' in exported
        assert 'darkroom_queue_depth{model="tiny",queue="darkroom:tiny"} 0.0' in exported
        start_worker(stack, "worker-other-2", other_worker_env)
        wait_for_ready(client, OTHER, 1)
        assert stack.wait_for(waiting, {"succeeded", "failed"})["status"] == "succeeded"


def test_hub_ids_work_as_model_names_in_paths_and_queues(redis_url: str, tmp_path: Path) -> None:
    """The default model is a hub id ('owner/name'): its slash survives the path and the queue name."""
    settings = Settings(redis_url=redis_url, storage_url=f"file://{tmp_path}", auth_disabled=True)
    with serve(create_app(settings), lifespan="on") as url, httpx.Client(base_url=url, timeout=30) as client:
        (entry,) = models(client).values()
        assert (entry["id"], entry["owned_by"], entry["default"]) == (DEFAULT_MODEL, "stabilityai", True)
        assert entry["ready_workers"] == 0 and entry["created"] == 0  # no worker has ever served it here
        assert client.get(f"/v1/models/{DEFAULT_MODEL}").json() == entry
        job = client.post("/v1/generations", json={**FAST, "model": DEFAULT_MODEL}).json()
        assert job["request"]["model"] == DEFAULT_MODEL and job["queue_position"] == 1
        assert models(client)[DEFAULT_MODEL]["queued"] == 1
    with redis.Redis.from_url(redis_url) as connection:
        assert connection.lrange(f"rq:queue:darkroom:{DEFAULT_MODEL}", 0, -1) == [job["id"].encode()]
