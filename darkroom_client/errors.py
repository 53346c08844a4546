"""What the client raises, so callers branch on stable codes instead of parsing prose.

Every error *answer* from the server becomes a :class:`DarkroomError` carrying the RFC 9457 problem it
sent (a proxy's HTML error page gets a synthesized one, so the shape is always the same). Network failures
stay ``httpx.TransportError``: they are not answers, and retrying them is the caller's policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

import httpx
from pydantic import ValidationError

from schemas.batches import Batch
from schemas.jobs import Job
from schemas.problems import PROBLEM_TYPE_BASE, FieldError, Problem

# Statuses worth retrying later; anything else will fail the same way again.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_DETAIL_CHARS = 300


class DarkroomError(Exception):
    """The server answered with an error: ``problem`` is its RFC 9457 body.

    ``code`` is the stable machine code (``validation_error``, ``not_found``, ``job_already_finished``…);
    ``errors`` lists the offending fields of a 422.
    """

    def __init__(self, problem: Problem, headers: Mapping[str, str] | None = None) -> None:
        self.problem = problem
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        super().__init__(self._message())

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def code(self) -> str:
        return self.problem.code

    @property
    def detail(self) -> str | None:
        return self.problem.detail

    @property
    def errors(self) -> list[FieldError]:
        return list(self.problem.errors or [])

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked us to wait (``Retry-After`` in seconds form), if any."""
        try:
            return float(self.headers["retry-after"])
        except (KeyError, ValueError):
            return None

    @property
    def retryable(self) -> bool:
        """True for transient failures (503 Redis outage, 429, gateway errors): the same call may succeed."""
        return self.status in RETRYABLE_STATUSES

    def _message(self) -> str:
        text = f"{self.status} {self.code}"
        if self.detail:
            text += f": {self.detail}"
        for error in self.errors:
            text += f"\n  {error.field}: {error.message}"
        return text

    @classmethod
    def from_response(cls, response: httpx.Response) -> DarkroomError:
        """Parse the problem body; anything else (a proxy's page, a truncated body) gets a synthesized one.

        The response body must already be read (``response.read()`` for streamed responses).
        """
        try:
            problem = Problem.model_validate_json(response.content)
        except ValidationError:
            problem = _synthesized_problem(response)
        return cls(problem, response.headers)


def _synthesized_problem(response: httpx.Response) -> Problem:
    status = response.status_code
    try:
        phrase = HTTPStatus(status).phrase
        code = HTTPStatus(status).name.lower()
    except ValueError:
        phrase, code = f"HTTP {status}", f"http_{status}"
    text = response.text.strip()
    return Problem(
        type=PROBLEM_TYPE_BASE + code,
        title=phrase,
        status=status,
        detail=text[:_DETAIL_CHARS] or None,
        code=code,
    )


class WaitTimeout(TimeoutError):
    """The job did not finish in time. It is still running on the server: ``job`` is the last view seen."""

    def __init__(self, job: Job, timeout: float) -> None:
        self.job = job
        self.timeout = timeout
        super().__init__(f"job {job.id} still {job.status.value} after {timeout:g}s")


class BatchWaitTimeout(TimeoutError):
    """The batch did not finish in time. Its items go on running: ``batch`` is the last view seen.

    A ``TimeoutError`` like :class:`WaitTimeout`, so one ``except TimeoutError`` covers both waits.
    """

    def __init__(self, batch: Batch, timeout: float) -> None:
        self.batch = batch
        self.timeout = timeout
        counts = batch.counts
        ended = counts.succeeded + counts.failed + counts.canceled
        super().__init__(
            f"batch {batch.id} still {batch.status.value} after {timeout:g}s ({ended}/{counts.total} ended)"
        )


class ChecksumMismatch(Exception):
    """A downloaded image does not hash to the job's ``sha256``: these are not the bytes that were made."""

    def __init__(self, url: str, expected: str, actual: str) -> None:
        self.url, self.expected, self.actual = url, expected, actual
        super().__init__(f"sha256 of the download is {actual}, the job says {expected}")
