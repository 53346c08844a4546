"""``darkroom batch`` as a user runs it: a subprocess against the running stack (stdout, stderr, exit code,
the files it leaves). Argument and file errors need no stack; they run in-process through ``main``."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from darkroom_client import BatchItemRequest, BatchStatus, CreateBatch, DarkroomClient, JobStatus, LoraRequest
from darkroom_client.cli import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE, main
from darkroom_client.cli_batch import read_batch_file
from devtools.net import free_port
from tests.darkroom_client.cli_process import CliRun, darkroom
from tests.darkroom_client.conftest import TINY, UNSERVED_MODEL
from tests.fixtures.stack import Stack

TINY_FLAGS = ["--width", "512", "--height", "512", "--steps", "2"]


def batch_id_in(text: str) -> str:
    match = re.search(r"batch_[0-9a-f]+", text)
    assert match, text
    return match.group(0)


def test_batch_create_with_seeds_and_a_lora_waits_and_downloads_every_image(
    client_stack: Stack, client: DarkroomClient, tmp_path: Path
) -> None:
    out = tmp_path / "foxes"
    done = darkroom(
        client_stack,
        *("batch", "create", "--prompt", "a red fox", "--seeds", "5-7", *TINY_FLAGS, "--lora", "ink:0.5"),
        *("--wait", "-o", str(out)),
    )

    assert done.returncode == 0, done.stderr
    assert "queued, 3 items" in done.stderr and "completed: 3 succeeded" in done.stderr
    summary = json.loads(done.stdout)
    assert (summary["status"], summary["counts"]["succeeded"]) == ("completed", 3)
    assert summary["directory"] == str(out.resolve())
    items = summary["items"]
    assert [item["index"] for item in items] == [0, 1, 2]
    assert [item["images"][0]["seed"] for item in items] == [5, 6, 7]
    assert [Path(item["images"][0]["path"]).name for item in items] == ["0000.png", "0001.png", "0002.png"]
    for item in items:
        entry = item["images"][0]
        data = Path(entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and entry["sha256_verified"] is True
        job = client.get(item["id"])
        assert job.batch_id == summary["id"] and job.request.loras == [LoraRequest(name="ink", scale=0.5)]
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png"]  # no partials


def test_batch_from_a_jsonl_file_then_the_wait_get_and_cancel_commands(
    client_stack: Stack, tmp_path: Path
) -> None:
    requests: list[dict[str, Any]] = [{**TINY, "seed": 41}, {**TINY, "seed": 50, "num_images": 2}]
    listing = tmp_path / "requests.jsonl"
    listing.write_text("\n".join(json.dumps(request) for request in requests) + "\n\n")

    created = darkroom(client_stack, "batch", "create", "--file", str(listing))
    assert created.returncode == 0, created.stderr
    batch = json.loads(created.stdout)
    assert batch["counts"]["total"] == 2 and len(batch["items"]) == 2

    out = tmp_path / "out"
    waited = darkroom(client_stack, "batch", "wait", batch["id"], "-o", str(out), "-q")
    assert waited.returncode == 0, waited.stderr
    assert waited.stderr == ""  # -q: no progress
    summary = json.loads(waited.stdout)
    assert [[image["seed"] for image in item["images"]] for item in summary["items"]] == [[41], [50, 51]]
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001-1.png", "0001.png"]
    with Image.open(out / "0001-1.png") as second:
        assert second.size == (512, 512)

    shown = darkroom(client_stack, "batch", "get", batch["id"])
    assert shown.returncode == 0, shown.stderr
    read = json.loads(shown.stdout)
    assert read["status"] == "completed" and [item["status"] for item in read["items"]] == ["succeeded"] * 2

    ended = darkroom(client_stack, "batch", "cancel", batch["id"])
    assert ended.returncode == EXIT_USAGE and "409 batch_already_finished" in ended.stderr
    missing = darkroom(client_stack, "batch", "get", "batch_missing")
    assert missing.returncode == EXIT_USAGE and "404 not_found" in missing.stderr


def test_an_item_that_did_not_succeed_exits_1_and_the_others_are_still_downloaded(
    client_stack: Stack, client: DarkroomClient, blocker: str, tmp_path: Path
) -> None:
    run = CliRun(
        client_stack,
        *("batch", "create", "--prompt", "a fox", "--seeds", "1-2", *TINY_FLAGS),
        *("--wait", "-o", str(tmp_path)),
    )
    run.wait_for_stderr("queued, 2 items")
    batch = client.get_batch(batch_id_in(run.stderr))
    first = (batch.items or [])[0].id
    assert client.cancel(first).status is JobStatus.CANCELED
    client.cancel(blocker)  # frees the worker: the second item runs
    returncode, stdout, stderr = run.finish()

    assert returncode == EXIT_JOB_FAILED, stderr
    assert f"batch {batch.id} completed: 1 succeeded, 0 failed, 1 canceled of 2" in stderr
    items = json.loads(stdout)["items"]
    assert (items[0]["id"], items[0]["status"], items[0]["images"]) == (first, "canceled", [])
    assert items[0]["error"]["type"] == "canceled"
    assert items[1]["status"] == "succeeded" and Path(items[1]["images"][0]["path"]) == tmp_path / "0001.png"
    assert [p.name for p in tmp_path.iterdir()] == ["0001.png"]


def test_timeout_and_ctrl_c_leave_a_watched_batch_running_but_cancel_one_the_command_submitted(
    client_stack: Stack, client: DarkroomClient, blocker: str, tmp_path: Path
) -> None:
    creator = CliRun(
        client_stack,
        *("batch", "create", "--prompt", "a fox", "--count", "2", *TINY_FLAGS),
        *("--wait", "-o", str(tmp_path)),
    )
    creator.wait_for_stderr("queued, 2 items")
    batch_id = batch_id_in(creator.stderr)

    late = darkroom(client_stack, "batch", "wait", batch_id, "--timeout", "0.5")
    assert late.returncode == EXIT_UNAVAILABLE, late.stderr
    assert f"still queued after 0.5s (0/2 ended); it goes on: `darkroom batch wait {batch_id}`" in late.stderr

    watcher = CliRun(client_stack, "batch", "wait", batch_id)
    watcher.wait_for_stderr("queued, 2 items")
    watcher.process.send_signal(signal.SIGINT)
    returncode, _, stderr = watcher.finish()
    assert returncode == EXIT_INTERRUPTED and f"interrupted; the batch goes on: {batch_id}" in stderr
    assert client.get_batch(batch_id, limit=0).status is BatchStatus.QUEUED

    creator.process.send_signal(signal.SIGINT)
    returncode, stdout, stderr = creator.finish()
    assert returncode == EXIT_INTERRUPTED, stderr
    assert f"interrupted; canceled: {batch_id}" in stderr and stdout == ""
    assert client.get_batch(batch_id, limit=0).status is BatchStatus.CANCELED
    assert not list(tmp_path.iterdir())


def test_batch_create_with_a_model_then_batch_list_and_models_show_it(
    client_stack: Stack, client: DarkroomClient
) -> None:
    """Batches for the model no worker serves stay queued: listing subjects that cost no GPU time."""
    older = client.create_batch(CreateBatch(template=BatchItemRequest(**TINY, model=UNSERVED_MODEL), count=1))
    created = darkroom(
        client_stack,
        *("batch", "create", "--prompt", "a fox", "--count", "2", *TINY_FLAGS, "--model", UNSERVED_MODEL),
    )
    assert created.returncode == 0, created.stderr
    newer = json.loads(created.stdout)
    try:
        assert (newer["model"], newer["status"]) == (UNSERVED_MODEL, "queued")
        assert {client.get(item["id"]).request.model for item in newer["items"]} == {UNSERVED_MODEL}

        listed = darkroom(client_stack, "batch", "list", "--limit", "1")
        assert listed.returncode == 0, listed.stderr
        created_at = client.get_batch(newer["id"], limit=0).created_at.isoformat(timespec="seconds")
        assert listed.stdout.splitlines() == [f"{newer['id']}  queued     {created_at}  2 items: 2 queued"]
        assert "more: darkroom batch list --offset 1 --limit 1" in listed.stderr

        page = darkroom(client_stack, "batch", "list", "--offset", "1", "--limit", "1", "--json")
        assert page.returncode == 0, page.stderr
        shown = json.loads(page.stdout)
        assert [batch["id"] for batch in shown["data"]] == [older.id] and shown["data"][0]["items"] is None
        assert shown["data"][0]["counts"]["queued"] == 1

        models = darkroom(client_stack, "models")
        assert models.returncode == 0, models.stderr
        assert "tiny-b           0 ready, 0 queued, 3 batch queued" in models.stdout.splitlines()
    finally:
        for batch_id in (older.id, newer["id"]):
            client.cancel_batch(batch_id)
    ended = darkroom(client_stack, "batch", "list", "--limit", "2")
    assert [line.split()[:2] for line in ended.stdout.splitlines()] == [
        [newer["id"], "canceled"],
        [older.id, "canceled"],
    ]
    assert ended.stdout.splitlines()[0].endswith("2 items: 2 canceled")


# --- without a server ---------------------------------------------------------------------------------------


def test_batch_list_arguments_are_checked_before_anything_is_sent(capsys: pytest.CaptureFixture[str]) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    for args, message in [
        (["--limit", "0"], "--limit 0: a page lists 1..100 batches"),
        (["--limit", "101"], "--limit 101: a page lists 1..100 batches"),
        (["--offset", "-1"], "--offset -1: must be 0 or more"),
    ]:
        assert main(["batch", "list", *args, "--server", server]) == EXIT_USAGE, args
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == "", (args, captured.err)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def run_offline(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``main`` against a port nobody listens on: exit 2 (not 3) proves the error came before any request."""
    server = f"http://127.0.0.1:{free_port()}"
    assert main(["batch", "create", *args, "--server", server]) == EXIT_USAGE, args
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "1-3"], "batch create needs --prompt (with --seeds or --count), or --file"),
        (["--prompt", "a fox"], "--prompt needs --seeds (one item per seed) or --count"),
        (["--prompt", "a fox", "--seeds", "8-1"], "--seeds 8-1: the range 8-1 runs backwards"),
        (["--prompt", "a fox", "--seeds", "1,x"], "--seeds 1,x: 'x' is not a seed or a range like 1-8"),
        (
            ["--prompt", "a fox", "--seeds", "0-4294967295"],
            "4294967296 seeds, but a batch holds at most 1000",
        ),
        (["--prompt", "a fox", "--seeds", "1-2", "--seed", "1"], "give the seeds in seeds or one seed in"),
        (
            ["--prompt", "a fox", "--count", "2", "--model", "my model"],
            "template.model (--model): String should match pattern",
        ),
        (
            ["--prompt", "a fox", "--count", "2", "--width", "500", "--height", "512"],
            "template.width (--width)",
        ),
        (
            ["--prompt", "a fox", "--count", "1001"],
            "count (--count): Input should be less than or equal to 1000",
        ),
        (
            ["--prompt", "a fox", "--count", "2", "--lora", "ink:x"],
            "--lora 'ink:x': SCALE 'x' is not a number",
        ),
        (
            ["--prompt", "a fox", "--count", "2", "-o", "out"],
            "-o without --wait: nothing would be waited for",
        ),
        (["--file", "/nonexistent/batch.json"], "--file: No such file or directory: /nonexistent/batch.json"),
    ],
)
def test_bad_batch_arguments_exit_2_before_anything_is_sent(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in run_offline(args, capsys)


def test_batch_files_in_every_format_give_the_same_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [{**TINY, "seed": 1}, {**TINY, "prompt": "a grey wolf"}]
    array = write(tmp_path / "batch.json", json.dumps(requests, indent=2))
    lines = write(tmp_path / "batch.ndjson", "".join(json.dumps(request) + "\n" for request in requests))
    whole = write(
        tmp_path / "body.json", json.dumps({"requests": requests, "webhook_events": ["batch.completed"]})
    )
    assert read_batch_file(array) == read_batch_file(lines) == {"requests": requests}
    assert read_batch_file(whole) == {"requests": requests, "webhook_events": ["batch.completed"]}
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(requests)))
    assert read_batch_file("-") == {"requests": requests}


def test_bad_batch_files_exit_2_naming_the_line_or_item(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path / "good.json", json.dumps([TINY]))
    assert "cannot be combined with --prompt, --width" in run_offline(
        ["--file", good, "--prompt", "a fox", "--width", "512"], capsys
    )
    broken = write(tmp_path / "broken.jsonl", json.dumps(TINY) + "\n{oops\n")
    assert "--file " + broken + ", line 2: not valid JSON" in run_offline(["--file", broken], capsys)
    lines = write(tmp_path / "lines.json", json.dumps(TINY) + "\n" + json.dumps(TINY) + "\n")
    assert "(JSON Lines files must end in .jsonl or .ndjson)" in run_offline(["--file", lines], capsys)
    scalar = write(tmp_path / "scalar.json", "7")
    assert "expected a JSON array of requests or a batch object" in run_offline(["--file", scalar], capsys)
    buffer = io.BytesIO()
    Image.new("RGB", (512, 512)).save(buffer, format="PNG")
    init = {**TINY, "init_image": base64.b64encode(buffer.getvalue()).decode()}
    image = write(tmp_path / "image.json", json.dumps({"requests": [TINY, init]}))
    assert "requests.1.init_image: batch items are text-to-image only" in run_offline(
        ["--file", image], capsys
    )
