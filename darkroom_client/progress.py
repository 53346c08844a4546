"""Showing a job's or a batch's progress on stderr without any dependency: queue position, then a bar.

On a terminal one line is rewritten in place; into a pipe or a log, a line is written only when something a
reader cares about changed (status, queue position, every tenth of the steps or of the items), so logs stay
short — a 1,000-item batch writes about a dozen lines, not a thousand.
"""

from __future__ import annotations

from typing import TextIO

from schemas.batches import Batch, BatchStatus
from schemas.jobs import Job, JobStatus

BAR_WIDTH = 24


def step_bar(step: int, total: int, width: int = BAR_WIDTH, unit: str = "steps") -> str:
    """``[#########---------------] 12/32 steps``: plain ASCII, so any terminal and any log can show it."""
    filled = width * step // total if total else 0
    return f"[{'#' * filled}{'-' * (width - filled)}] {step}/{total} {unit}"


def describe(job: Job) -> tuple[str, tuple[object, ...]]:
    """The status line for ``job`` and the key deciding whether a non-terminal output repeats it."""
    if job.status is JobStatus.QUEUED:
        where = f", position {job.queue_position}" if job.queue_position is not None else ""
        return f"{job.id} queued{where}", (job.status, job.queue_position)
    if job.status is JobStatus.RUNNING and job.progress is not None and job.progress.total:
        step, total = job.progress.step, job.progress.total
        tenth = 10 * step // total
        return f"{job.id} {step_bar(step, total)}", (job.status, tenth)
    return f"{job.id} {job.status.value}", (job.status,)


def describe_batch(batch: Batch) -> tuple[str, tuple[object, ...]]:
    """``batch_… [######------] 3/8 items: 2 succeeded, 1 failed; 1 running`` and its repeat key.

    "Done" counts every item that ended, however it ended, since that is what the wait is waiting for; the
    outcomes are spelled out beside it so a failing batch shows as one at once, not only at the end.
    """
    counts = batch.counts
    ended = counts.succeeded + counts.failed + counts.canceled
    outcomes = ", ".join(
        f"{number} {name}"
        for number, name in (
            (counts.succeeded, "succeeded"),
            (counts.failed, "failed"),
            (counts.canceled, "canceled"),
        )
        if number
    )
    if batch.status.is_terminal:
        return f"{batch.id} {batch.status.value}: {outcomes or 'no items'}", (batch.status,)
    if batch.status is BatchStatus.QUEUED:
        return f"{batch.id} queued, {counts.total} items", (batch.status,)
    text = f"{batch.id} {step_bar(ended, counts.total, unit='items')}"
    text += f": {outcomes}" if outcomes else ""
    text += f"; {counts.running} running" if counts.running else ""
    tenth = 10 * ended // counts.total if counts.total else 0
    return text, (batch.status, tenth)


class _LineDisplay:
    """One status line on ``stream`` (stderr: stdout is for the result), rewritten on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.rewrite = stream.isatty()
        self._key: tuple[object, ...] | None = None
        self._width = 0

    def show(self, text: str, key: tuple[object, ...]) -> None:
        if self.rewrite:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        elif key != self._key:
            self.stream.write(text + "\n")
        self._key = key
        self.stream.flush()

    def finish(self) -> None:
        """End the rewritten line, so what follows starts on its own."""
        if self.rewrite and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


class ProgressDisplay(_LineDisplay):
    """A ``wait(on_progress=...)`` callback: a job's queue position, then its steps."""

    def __call__(self, job: Job) -> None:
        self.show(*describe(job))


class BatchProgressDisplay(_LineDisplay):
    """A ``wait_batch(on_progress=...)`` callback: how many items have ended, and how."""

    def __call__(self, batch: Batch) -> None:
        self.show(*describe_batch(batch))
