"""Showing a job's progress on stderr without any dependency: queue position, then a step bar.

On a terminal one line is rewritten in place; into a pipe or a log, a line is written only when something a
reader cares about changed (status, queue position, every tenth of the steps), so logs stay short.
"""

from __future__ import annotations

from typing import TextIO

from schemas.jobs import Job, JobStatus

BAR_WIDTH = 24


def step_bar(step: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[#########---------------] 12/32 steps``: plain ASCII, so any terminal and any log can show it."""
    filled = width * step // total if total else 0
    return f"[{'#' * filled}{'-' * (width - filled)}] {step}/{total} steps"


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


class ProgressDisplay:
    """A ``wait(on_progress=...)`` callback that reports to ``stream`` (stderr: stdout is for the result)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.rewrite = stream.isatty()
        self._key: tuple[object, ...] | None = None
        self._width = 0

    def __call__(self, job: Job) -> None:
        text, key = describe(job)
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
