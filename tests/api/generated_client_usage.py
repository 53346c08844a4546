"""A script that uses only the client openapi-python-client generates from docs/openapi.json.

``tests/api/test_generated_client.py`` generates ``darkroom_api_client`` into a temporary folder, checks
this file with ``mypy --strict`` against it, then runs it against a live API with keys on:
``python generated_client_usage.py BASE_URL API_KEY``. It is what an integrator writes, so it branches on
the generated types (``isinstance(..., Job)``), never on raw JSON; every check that fails exits non-zero.
"""

from __future__ import annotations

import hashlib
import sys
import time
from urllib.parse import parse_qs, unquote, urlsplit

from darkroom_api_client import AuthenticatedClient, Client
from darkroom_api_client.api.batches import create_batch, get_batch
from darkroom_api_client.api.files import download_file
from darkroom_api_client.api.generations import create_generation, get_generation
from darkroom_api_client.api.models import list_models, retrieve_model
from darkroom_api_client.models import (
    Batch,
    BatchItemRequest,
    BatchStatus,
    CreateBatch,
    CreateGeneration,
    Job,
    JobStatus,
    ModelList,
    Problem,
    ServedModel,
)
from darkroom_api_client.types import File

FINISHED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
STEPS = 2


def wait_for_job(client: AuthenticatedClient, job_id: str, timeout_s: float = 120.0) -> Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = get_generation.sync(job_id, client=client)
        assert isinstance(job, Job), job
        if job.status in FINISHED or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def download(files: Client, url: str) -> bytes:
    """Fetch an image by the signed URL on the job, through the generated downloadFile operation."""
    parts = urlsplit(url)
    key = unquote(parts.path.removeprefix("/v1/files/"))
    query = parse_qs(parts.query)
    response = download_file.sync_detailed(
        key, client=files, expires=query["expires"][0], signature=query["signature"][0]
    )
    assert response.status_code == 200, response.status_code
    assert isinstance(response.parsed, File), response.parsed
    return response.parsed.payload.read()


def generate_and_download(client: AuthenticatedClient, files: Client) -> None:
    body = CreateGeneration(prompt="a lighthouse", num_inference_steps=STEPS, seed=7, width=512, height=512)
    submitted = create_generation.sync_detailed(client=client, body=body)
    assert submitted.status_code == 202, submitted.status_code
    assert isinstance(submitted.parsed, Job), submitted.parsed
    job = wait_for_job(client, submitted.parsed.id)
    assert job.status is JobStatus.SUCCEEDED, (job.status, job.error)
    assert job.error is None and job.warnings == []
    image = job.images[0]
    assert image.url is not None and image.sha256 is not None
    data = download(files, image.url)
    assert hashlib.sha256(data).hexdigest() == image.sha256, "downloaded bytes differ from the job's sha256"
    assert job.request.seed == 7 and job.request.num_inference_steps == STEPS


def batch_round_trip(client: AuthenticatedClient) -> None:
    template = BatchItemRequest(prompt="a red kite", num_inference_steps=STEPS, width=512, height=512)
    created = create_batch.sync(client=client, body=CreateBatch(template=template, seeds=[1, 2]))
    assert isinstance(created, Batch), created
    assert created.counts.total == 2
    deadline = time.monotonic() + 120.0
    batch = created
    while batch.status is not BatchStatus.COMPLETED and time.monotonic() < deadline:
        time.sleep(0.2)
        read = get_batch.sync(created.id, client=client)
        assert isinstance(read, Batch), read
        batch = read
    assert batch.status is BatchStatus.COMPLETED, batch.status
    assert batch.counts.succeeded == 2
    assert batch.items is not None and [len(item.images) for item in batch.items] == [1, 1]


def models(client: AuthenticatedClient) -> None:
    listed = list_models.sync(client=client)
    assert isinstance(listed, ModelList), listed
    default = next(model for model in listed.data if model.default)
    one = retrieve_model.sync(default.id, client=client)
    assert isinstance(one, ServedModel) and one.id == default.id, one
    missing = retrieve_model.sync("no-such-model", client=client)
    assert isinstance(missing, Problem) and missing.status == 404, missing


def validation_problem(client: AuthenticatedClient) -> None:
    response = create_generation.sync_detailed(
        client=client, body=CreateGeneration(prompt="a fox", num_inference_steps=500)
    )
    assert response.status_code == 422, response.status_code
    problem = response.parsed
    assert isinstance(problem, Problem), problem
    assert problem.code == "validation_error", problem.code
    assert problem.errors and problem.errors[0].field == "num_inference_steps", problem.errors


def unauthenticated(base_url: str) -> None:
    anonymous = AuthenticatedClient(base_url=base_url, token="not-a-key")
    response = list_models.sync_detailed(client=anonymous)
    assert response.status_code == 401 and isinstance(response.parsed, Problem), response


def main(base_url: str, api_key: str) -> int:
    with (
        AuthenticatedClient(base_url=base_url, token=api_key, raise_on_unexpected_status=True) as client,
        Client(base_url=base_url, raise_on_unexpected_status=True) as files,
    ):
        generate_and_download(client, files)
        batch_round_trip(client)
        models(client)
        validation_problem(client)
    unauthenticated(base_url)
    print("generated client: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
