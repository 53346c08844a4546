"""The ``darkroom`` CLI as a user runs it: a subprocess against the running stack, reading stdout and stderr.

Argument errors and an unreachable server need no stack; they run in-process through ``main``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import signal
from pathlib import Path

import pytest
from PIL import Image

from darkroom_client import DarkroomClient, JobStatus, LoraRequest, Outpaint
from darkroom_client.cli import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE, main
from darkroom_client.request_options import parse_outpaint
from devtools.net import free_port
from tests.darkroom_client.cli_process import CliRun, darkroom
from tests.darkroom_client.conftest import SMALL, TERMINAL, TINY, UNSERVED_MODEL
from tests.fixtures.stack import Stack


def test_generate_shows_queue_position_then_steps_and_saves_verified_images(
    client_stack: Stack, client: DarkroomClient, blocker: str, tmp_path: Path
) -> None:
    run = CliRun(
        client_stack,
        "generate",
        "a red fox in the snow",
        *("--width", "512", "--height", "512", "--steps", "3", "--seed", "42", "--num-images", "2"),
        *("-o", str(tmp_path / "fox.png")),
    )
    run.wait_for_stderr("queued, position 1")
    client.cancel(blocker)  # frees the worker: the CLI's job runs next
    returncode, stdout, stderr = run.finish()

    assert returncode == 0, stderr
    assert "[########################] 3/3 steps" in stderr
    assert stderr.index("queued, position 1") < stderr.index("1/3 steps") < stderr.index("3/3 steps")
    summary = json.loads(stdout)
    assert summary["status"] == "succeeded" and summary["seed"] == 42
    entries = summary["images"]
    assert [Path(entry["path"]) for entry in entries] == [tmp_path / "fox.png", tmp_path / "fox-1.png"]
    assert [entry["seed"] for entry in entries] == [42, 43]
    job = client.get(summary["id"])
    for entry, image in zip(entries, job.images, strict=True):
        data = Path(entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] == image.sha256
        assert entry["sha256_verified"] is True and entry["bytes"] == len(data)
        with Image.open(io.BytesIO(data)) as decoded:
            assert (decoded.format, decoded.size) == ("PNG", (512, 512))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-1.png", "fox.png"]  # no partial files left


def test_ctrl_c_cancels_the_job_on_the_server(client_stack: Stack, tmp_path: Path) -> None:
    run = CliRun(
        client_stack,
        *("generate", "a long exposure", "--width", "512", "--height", "512", "--steps", "100"),
        *("-o", str(tmp_path / "never.png")),
    )
    run.wait_for_stderr("steps")  # it is running on the worker
    run.process.send_signal(signal.SIGINT)
    returncode, stdout, stderr = run.finish()

    assert returncode == EXIT_INTERRUPTED, stderr
    match = re.search(r"gen_[0-9a-f]+", stderr)
    assert match, stderr
    assert f"interrupted; cancel requested: {match.group(0)}" in stderr
    job = client_stack.wait_for(match.group(0), TERMINAL, timeout=30)
    assert job["status"] == "canceled" and job["progress"]["step"] < 100
    assert stdout == "" and not list(tmp_path.iterdir())


def test_status_and_cancel_commands(client_stack: Stack, client: DarkroomClient, blocker: str) -> None:
    queued = client.generate(SMALL)

    status = darkroom(client_stack, "status", queued.id)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["id"], shown["status"], shown["queue_position"]) == (queued.id, "queued", 1)

    canceled = darkroom(client_stack, "cancel", queued.id)
    assert canceled.returncode == 0, canceled.stderr
    assert json.loads(canceled.stdout)["status"] == "canceled"

    again = darkroom(client_stack, "cancel", queued.id)
    assert again.returncode == EXIT_USAGE and again.stdout == ""
    assert "409 job_already_finished" in again.stderr

    missing = darkroom(client_stack, "status", "gen_missing")
    assert missing.returncode == EXIT_USAGE
    assert "404 not_found" in missing.stderr


def test_a_failed_job_exits_1_with_its_error(
    client_stack: Stack, client: DarkroomClient, blocker: str, tmp_path: Path
) -> None:
    """Canceling the job from elsewhere is the one failure the tiny model can be made to have."""
    run = CliRun(
        client_stack,
        *("generate", "doomed", "--width", "512", "--height", "512", "--steps", "2"),
        *("-o", str(tmp_path / "doomed.png")),
    )
    run.wait_for_stderr("queued, position 1")
    match = re.search(r"gen_[0-9a-f]+", run.stderr)
    assert match
    client.cancel(match.group(0))
    returncode, stdout, stderr = run.finish()

    assert returncode == EXIT_JOB_FAILED, stderr
    assert f"job {match.group(0)} canceled: canceled: canceled while queued" in stderr
    summary = json.loads(stdout)
    assert summary["status"] == "canceled" and summary["images"] == []
    assert summary["error"] == {"type": "canceled", "message": "canceled while queued"}


def tiny_args(seed: int) -> list[str]:
    return [
        "--width",
        str(TINY["width"]),
        "--height",
        str(TINY["height"]),
        "--steps",
        "2",
        "--seed",
        str(seed),
    ]


def test_generate_with_loras_sends_them_and_an_unknown_one_is_refused_by_the_server(
    client_stack: Stack, client: DarkroomClient, tmp_path: Path
) -> None:
    done = darkroom(
        client_stack,
        *("generate", "a fox", *tiny_args(5), "--lora", "ink:0.5", "--lora", "rust"),
        *("-o", str(tmp_path / "fox.png")),
    )
    assert done.returncode == 0, done.stderr
    job = client.get(json.loads(done.stdout)["id"])
    assert job.request.loras == [LoraRequest(name="ink", scale=0.5), LoraRequest(name="rust", scale=1.0)]
    assert (tmp_path / "fox.png").is_file()

    unknown = darkroom(client_stack, "generate", "a fox", *tiny_args(5), "--lora", "sepia")
    assert unknown.returncode == EXIT_USAGE and unknown.stdout == ""
    assert "422 lora_not_found" in unknown.stderr
    assert "loras.0.name:" in unknown.stderr and "offers: ink, rust" in unknown.stderr


def write_png(path: Path, size: tuple[int, int], *, right_half: bool = False) -> Path:
    """A grey image, or (``right_half``) a mask repainting the right half: white repaints, black keeps."""
    image = Image.new("L", size, 0 if right_half else 128)
    if right_half:
        image.paste(255, (size[0] // 2, 0, size[0], size[1]))
    image.save(path)
    return path


def test_generate_with_a_mask_inpaints_the_init_image(
    client_stack: Stack, client: DarkroomClient, tmp_path: Path
) -> None:
    init = write_png(tmp_path / "init.png", (512, 512))
    mask = write_png(tmp_path / "mask.png", (512, 512), right_half=True)
    done = darkroom(
        client_stack,
        *("generate", "a red boat", *tiny_args(3), "--strength", "1.0"),
        *("--init-image", str(init), "--mask", str(mask), "-o", str(tmp_path / "boat.png")),
    )
    assert done.returncode == 0, done.stderr
    job = client.get(json.loads(done.stdout)["id"])
    assert job.mask_image_url is not None and job.init_image_url is not None  # sent, stored, inpainted
    assert (job.request.width, job.request.height, job.request.strength) == (512, 512, 1.0)
    with Image.open(tmp_path / "boat.png") as boat:
        assert boat.size == (512, 512)


def test_mask_errors_name_the_flag_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = write_png(tmp_path / "init.png", (512, 512))
    small_mask = write_png(tmp_path / "mask.png", (256, 256), right_half=True)
    server = f"http://127.0.0.1:{free_port()}"  # nobody listens: exit 2 proves nothing was sent
    cases = [
        (["--mask", str(small_mask)], "--mask needs --init-image"),
        (["--init-image", str(init), "--mask", str(tmp_path / "missing.png")], "--mask: No such file"),
        (
            ["--init-image", str(init), "--mask", str(small_mask)],
            "mask_image (--mask): mask_image is 256x256 but init_image is 512x512",
        ),
    ]
    for args, message in cases:
        assert main(["generate", "a boat", *args, "--server", server]) == EXIT_USAGE, args
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == "", (args, captured.err)


def test_generate_with_outpaint_grows_the_init_image_and_the_server_draws_the_mask(
    client_stack: Stack, client: DarkroomClient, tmp_path: Path
) -> None:
    init = write_png(tmp_path / "init.png", (256, 512))  # + 128 px each side: a 512x512 canvas
    done = darkroom(
        client_stack,
        *("generate", "a harbour, wide shot", "--steps", "2", "--seed", "9", "--init-image", str(init)),
        *("--outpaint", "left=128,right=128,feather=8", "-o", str(tmp_path / "wide.png")),
    )
    assert done.returncode == 0, done.stderr
    job = client.get(json.loads(done.stdout)["id"])
    assert job.request.outpaint == Outpaint(left=128, right=128, feather=8)
    assert (job.request.width, job.request.height, job.request.strength) == (512, 512, 1.0)
    with Image.open(tmp_path / "wide.png") as wide:
        assert wide.size == (512, 512)
    assert job.mask_image_url is not None
    mask_path = client.download(job.mask_image_url, tmp_path / "mask.png")
    with Image.open(mask_path) as mask:
        # White over the new border, black over the image, fading over 8 px inside each grown side.
        row = [mask.convert("L").getpixel((x, 256)) for x in (0, 127, 128, 136, 256, 375, 383, 384, 511)]
    assert row[:2] == [255, 255] and row[3:6] == [0, 0, 0] and row[7:] == [255, 255]
    assert 0 < row[2] < 255 and 0 < row[6] < 255


def test_outpaint_values_by_name_or_in_order() -> None:
    assert parse_outpaint("right=256") == {"right": 256}
    assert parse_outpaint("Left=128, right=128,feather=24") == {"left": 128, "right": 128, "feather": 24}
    assert parse_outpaint("128,128,0,0") == {"left": 128, "right": 128, "top": 0, "bottom": 0}
    assert parse_outpaint("0,0,64,32,4") == {"left": 0, "right": 0, "top": 64, "bottom": 32, "feather": 4}


def test_outpaint_errors_name_the_flag_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = str(write_png(tmp_path / "init.png", (512, 512)))
    mask = str(write_png(tmp_path / "mask.png", (512, 512), right_half=True))
    server = f"http://127.0.0.1:{free_port()}"  # nobody listens: exit 2 proves nothing was sent
    given = ["--init-image", init]
    cases = [
        (["--outpaint", "left=128"], "--outpaint needs --init-image: it grows that image's canvas"),
        (
            [*given, "--mask", mask, "--outpaint", "left=128"],
            "--outpaint cannot be combined with --mask: outpainting draws its own mask",
        ),
        ([*given, "--outpaint", "wide=128"], "'wide' is not one of left, right, top, bottom, feather"),
        ([*given, "--outpaint", "left=big"], "--outpaint 'left=big': left 'big' is not a whole number"),
        ([*given, "--outpaint", "left=1,left=2"], "--outpaint 'left=1,left=2': left is given twice"),
        ([*given, "--outpaint", "left=1,2"], "--outpaint 'left=1,2': name every side or none"),
        ([*given, "--outpaint", "128,128"], "2 values, but the list form takes LEFT,RIGHT,TOP,BOTTOM"),
        (
            [*given, "--outpaint", "left=2000"],
            "outpaint.left (--outpaint): Input should be less than or equal to 1024",
        ),
        ([*given, "--outpaint", "0,0,0,0"], "outpaint (--outpaint): outpaint needs at least one of left"),
    ]
    for args, message in cases:
        assert main(["generate", "a harbour", *args, "--server", server]) == EXIT_USAGE, args
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == "", (args, captured.err)


def test_models_command_and_generate_with_a_model(client_stack: Stack, client: DarkroomClient) -> None:
    listed = darkroom(client_stack, "models")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "tiny    default  1 ready, 0 queued, 0 batch queued",
        "tiny-b           0 ready, 0 queued, 0 batch queued",
    ]
    as_json = darkroom(client_stack, "models", "--json")
    assert as_json.returncode == 0, as_json.stderr
    models = json.loads(as_json.stdout)
    assert [(m["id"], m["default"], m["ready_workers"]) for m in models] == [
        ("tiny", True, 1),
        (UNSERVED_MODEL, False, 0),
    ]

    # No worker serves tiny-b: the job waits, so the CLI gives up at --timeout and the job is still there.
    waiting = darkroom(
        client_stack, "generate", "a fox", *tiny_args(1), "--model", UNSERVED_MODEL, "--timeout", "0.5"
    )
    assert waiting.returncode == EXIT_UNAVAILABLE, waiting.stderr
    match = re.search(r"gen_[0-9a-f]+", waiting.stderr)
    assert match, waiting.stderr
    job = client.get(match.group(0))
    assert (job.status, job.request.model) == (JobStatus.QUEUED, UNSERVED_MODEL)
    assert client.cancel(job.id).status is JobStatus.CANCELED

    unknown = darkroom(client_stack, "generate", "a fox", *tiny_args(1), "--model", "sd-nope")
    assert unknown.returncode == EXIT_USAGE and unknown.stdout == ""
    assert "422 model_not_found" in unknown.stderr and "model:" in unknown.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "500", "--height", "512"], "width (--width): width 500 is not a multiple of 16"),
        (["--model", "my model"], "model (--model): String should match pattern"),
        (["--width", "512"], "width and height must be given together"),
        (["--format", "jpeg", "-o", "fox.png"], "-o fox.png does not match --format jpeg"),
        (["--init-image", "/nonexistent/fox.png"], "--init-image: No such file or directory"),
        (["--strength", "0.5"], "strength (--strength): strength applies to image-to-image only"),
        (["--lora", "ink:strong"], "--lora 'ink:strong': SCALE 'strong' is not a number (NAME[:SCALE]"),
        (["--lora", ":0.5"], "--lora ':0.5': the adapter name is missing"),
        (["--lora", "my ink"], "--lora 'my ink': 'my ink' is not an adapter name"),
        (["--lora", "ink:inf"], "--lora 'ink:inf': SCALE must be a finite number"),
        (["--lora", "ink:3"], "loras.0.scale (--lora): Input should be less than or equal to 2"),
        (
            ["--lora", "ink", "--lora", "ink:0.5"],
            "loras (--lora): each LoRA may be listed once; repeated: ink",
        ),
    ],
)
def test_bad_arguments_exit_2_before_anything_is_sent(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No server listens there: a request would fail with exit 3, so exit 2 proves nothing was sent.
    server = f"http://127.0.0.1:{free_port()}"
    assert main(["generate", "a fox", *args, "--server", server]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_an_unreachable_server_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "gen_x", "--server", server]) == EXIT_UNAVAILABLE
    assert f"cannot talk to {server}" in capsys.readouterr().err
