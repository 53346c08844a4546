"""The CLI's progress lines: rewritten in place on a terminal, sparse and line by line into a pipe."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from darkroom_client.progress import ProgressDisplay, step_bar
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
