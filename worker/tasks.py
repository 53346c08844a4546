"""The RQ task the API enqueues by dotted path (``worker.tasks.run_generation``).

Thin on purpose: it finds the warm engine this process loaded at start-up and hands over to
:func:`worker.runner.execute_generation`. A process that never loaded one (e.g. a stray ``rq worker``)
fails loudly instead of loading a multi-GB model inside a job.
"""

from __future__ import annotations

from worker.runner import WorkerContext, execute_generation

_context: WorkerContext | None = None


def install_context(context: WorkerContext | None) -> None:
    """Called once by the worker process after the model is loaded and warm."""
    global _context
    _context = context


def run_generation(job_id: str) -> str:
    if _context is None:
        raise RuntimeError("this process has no loaded model: run generation jobs with `python -m worker`")
    return execute_generation(_context, job_id)
