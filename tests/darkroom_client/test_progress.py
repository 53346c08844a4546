"""The CLI's progress lines, for jobs and batches: rewritten in place on a terminal, sparse and line by
line into a pipe."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from darkroom_client.progress import BatchProgressDisplay, ProgressDisplay, describe_batch, step_bar
from schemas.batches import Batch, BatchCounts, BatchStatus
from schemas.generation import GenerationRequest
from schemas.jobs import Job, JobStatus, Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def updates(total: int) -> list[Job]:
    queued = Job(
        id="gen_1",
        status=JobStatus.QUEUED,
        queue_position=2,
        created_at=datetime.now(UTC),
        request=GenerationRequest(prompt="a fox"),
    )
    running = queued.model_copy(update={"status": JobStatus.RUNNING, "queue_position": None})
    return [
        queued,
        queued.model_copy(update={"queue_position": 1}),
        running,
        *(
            running.model_copy(update={"progress": Progress(step=i, total=total)})
            for i in range(1, total + 1)
        ),
        running.model_copy(update={"status": JobStatus.SUCCEEDED}),
    ]


def test_a_pipe_gets_a_line_per_change_and_about_ten_for_the_steps() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out)
    for job in updates(total=40):
        display(job)
    display.finish()
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["gen_1 queued, position 2", "gen_1 queued, position 1", "gen_1 running"]
    steps = [line.split("] ")[1] for line in lines if "steps" in line]
    assert steps[0] == "1/40 steps" and steps[-1] == "40/40 steps" and len(steps) == 11
    assert lines[-1] == "gen_1 succeeded"


def test_a_terminal_gets_one_rewritten_line() -> None:
    out = Terminal()
    display = ProgressDisplay(out)
    for job in updates(total=4):
        display(job)
    display.finish()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = text.rstrip("\n").split("\r")[1:]
    assert frames[-2] == f"gen_1 {step_bar(4, 4)}"
    assert frames[-1].rstrip() == "gen_1 succeeded" and len(frames[-1]) == len(frames[-2])  # old text blanked


def test_step_bar() -> None:
    assert step_bar(0, 8, width=8) == "[--------] 0/8 steps"
    assert step_bar(3, 8, width=8) == "[###-----] 3/8 steps"
    assert step_bar(8, 8, width=8) == "[########] 8/8 steps"


def batch_updates(total: int) -> list[Batch]:
    """A batch as polled: queued, then items ending one by one (the last one failing), then completed."""
    queued = Batch(
        id="batch_1", status=BatchStatus.QUEUED, created_at=datetime.now(UTC), counts=BatchCounts(total=total)
    )
    views = [queued]
    for ended in range(total):
        succeeded, failed = min(ended, total - 1), max(0, ended - (total - 1))
        counts = BatchCounts(
            total=total, succeeded=succeeded, failed=failed, running=1, queued=total - ended - 1
        )
        views.append(queued.model_copy(update={"status": BatchStatus.RUNNING, "counts": counts}))
    final = BatchCounts(total=total, succeeded=total - 1, failed=1)
    return [*views, queued.model_copy(update={"status": BatchStatus.COMPLETED, "counts": final})]


def test_a_batch_in_a_pipe_gets_about_ten_lines_whatever_its_size() -> None:
    out = io.StringIO()
    display = BatchProgressDisplay(out)
    for batch in batch_updates(total=200):
        display(batch)
    lines = out.getvalue().splitlines()
    assert lines[0] == "batch_1 queued, 200 items"
    assert lines[1] == f"batch_1 {step_bar(0, 200, unit='items')}; 1 running"
    assert f"batch_1 {step_bar(100, 200, unit='items')}: 100 succeeded; 1 running" in lines
    assert lines[-1] == "batch_1 completed: 199 succeeded, 1 failed"
    assert len(lines) == 1 + 10 + 1  # queued, one per tenth of the items, the end


def test_a_canceled_batch_says_how_its_items_ended() -> None:
    counts = BatchCounts(total=4, succeeded=1, canceled=3)
    batch = batch_updates(total=4)[0].model_copy(update={"status": BatchStatus.CANCELED, "counts": counts})
    assert describe_batch(batch)[0] == "batch_1 canceled: 1 succeeded, 3 canceled"
