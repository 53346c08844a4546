"""A thin, typed client for the darkroom API, on httpx and the service's own pydantic models.

Hand-written rather than generated: the API is a handful of calls, and the parts a generator gets wrong are
exactly the ones worth care here — problem+json errors, ``Prefer: wait``, resuming an SSE stream, paging a
batch's items, and downloading images with their checksum verified. Requests, jobs and batches are the
``schemas`` models the server itself uses, so a request that validates here is one the server accepts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from darkroom_client.errors import BatchWaitTimeout, ChecksumMismatch, DarkroomError, WaitTimeout
from darkroom_client.events import Event, SSEDecoder
from schemas.batches import MAX_PAGE, Batch, BatchList, CreateBatch
from schemas.generation import NORMALIZED_CONTEXT, GenerationRequest
from schemas.jobs import CreateGeneration, ImageResult, Job, JobStatus
from schemas.models import ModelList, ServedModel
from schemas.openai_images import ImageGenerationRequest, ImagesResponse
from schemas.problems import PROBLEM_TYPE_BASE, Problem

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 30.0
# The server pings an idle event stream every 15 s, so 30 s of silence means the connection is dead.
SSE_READ_TIMEOUT_S = 30.0
# After this many broken event streams in a row (a buffering proxy, say), wait() polls instead.
STREAM_FAILURES_BEFORE_POLLING = 3
# How long wait() rides out a server that answers 503 or cannot be reached before giving up.
OUTAGE_TOLERANCE_S = 60.0
# GET /v1/batches' page: 20 batches unless asked, at most 100 (each listed batch reads its items' states).
DEFAULT_BATCH_LIST_PAGE = 20
MAX_BATCH_LIST_PAGE = 100
# POST /v1/images/generations answers once its job ends: up to the server's 120 s wait (by default), then 504.
OPENAI_IMAGES_TIMEOUT_S = 150.0

RequestBody = CreateGeneration | GenerationRequest | Mapping[str, Any]
"""A model is sent with only the fields that were set; a mapping is sent as-is (validated by the server)."""
BatchBody = CreateBatch | Mapping[str, Any]
"""``POST /v1/batches``'s body: as for :data:`RequestBody`, a model sends only the fields that were set."""
ProgressCallback = Callable[[Job], None]
BatchProgressCallback = Callable[[Batch], None]
Origin = tuple[str, str, int | None]
_T = TypeVar("_T")


def _version() -> str:
    try:
        return metadata.version("darkroom")
    except metadata.PackageNotFoundError:
        return "0"


def _origin(url: httpx.URL) -> Origin:
    return (url.scheme, url.host, url.port)


class _BearerAuth(httpx.Auth):
    """``Authorization: Bearer <key>`` on requests to the API's own origin, and nowhere else.

    Image URLs can point at S3 (presigned URLs refuse a second auth mechanism) or a CDN that must never see
    the key, so the key is scoped to the origin it was configured for.
    """

    def __init__(self, api_key: str, origin: Origin) -> None:
        self._header = f"Bearer {api_key}"
        self._origin = origin

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) == self._origin:
            request.headers["Authorization"] = self._header
        yield request


def _body(request: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(request, BaseModel):
        # Unset fields stay unset: the server fills defaults (and a new server may have better ones). The
        # Idempotency-Key fingerprint does not care: the server compares requests with defaults filled in.
        return request.model_dump(mode="json", exclude_unset=True)
    return dict(request)


def _job_path(job_id: str, suffix: str = "") -> str:
    return f"/v1/generations/{quote(job_id, safe='')}{suffix}"


def _batch_path(batch_id: str, suffix: str = "") -> str:
    return f"/v1/batches/{quote(batch_id, safe='')}{suffix}"


def _idempotency(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Idempotency-Key": key}


def _parse_batch(response: httpx.Response) -> Batch:
    if response.is_error:
        raise DarkroomError.from_response(response)
    return Batch.model_validate_json(response.content)


def _parse_job(response: httpx.Response) -> Job:
    if response.is_error:
        raise DarkroomError.from_response(response)
    # The job's request is already normalised (seed and exact size filled in, aspect_ratio kept): reading it
    # back needs the same context the server renders it with.
    return Job.model_validate_json(response.content, context=NORMALIZED_CONTEXT)


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in its seconds form (what the API sends on a job still queued or running)."""
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _not_a_stream(response: httpx.Response) -> DarkroomError:
    content_type = response.headers.get("content-type", "none")
    problem = Problem(
        type=PROBLEM_TYPE_BASE + "unexpected_response",
        title="Unexpected response",
        status=response.status_code,
        detail=f"expected an event stream, got {content_type} (a buffering proxy in between?)",
        code="unexpected_response",
    )
    return DarkroomError(problem, response.headers)


class DarkroomClient:
    """Synchronous client: ``with DarkroomClient(url) as client: job = client.generate(...)``.

    ``timeout`` bounds each request (connect, read, write); waiting for a job is bounded separately by
    :meth:`wait`'s own ``timeout``. ``transport`` is for tests and custom networking (proxies, retries).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        origin = _origin(httpx.URL(self.base_url))
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            auth=_BearerAuth(api_key, origin) if api_key else None,
            transport=transport,
            headers={"User-Agent": f"darkroom-client/{_version()}"},
        )

    def __enter__(self) -> DarkroomClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- the API -----------------------------------------------------------------------------------------

    def generate(
        self, request: RequestBody, *, idempotency_key: str | None = None, wait: float | None = None
    ) -> Job:
        """Submit a job. Returns it queued (202) — or finished, if ``wait`` seconds were enough (200).

        ``idempotency_key`` makes retries safe: the same key and body return the same job instead of a
        second one. ``wait`` sends ``Prefer: wait=N``; the server caps N (60 s by default).
        """
        headers = _idempotency(idempotency_key)
        timeout: httpx.Timeout | float = self.timeout
        if wait is not None and wait > 0:
            seconds = math.ceil(wait)
            headers["Prefer"] = f"wait={seconds}"
            timeout = httpx.Timeout(self.timeout, read=self.timeout + seconds)
        response = self._http.post("/v1/generations", json=_body(request), headers=headers, timeout=timeout)
        return _parse_job(response)

    def get(self, job_id: str) -> Job:
        """The job now, with image URLs freshly signed (they expire: read again rather than store them)."""
        return self._get_polled(job_id)[0]

    def _get_polled(self, job_id: str) -> tuple[Job, float | None]:
        """:meth:`get`, and the server's ``Retry-After`` hint for the next poll (seconds; None if absent)."""
        response = self._http.get(_job_path(job_id))
        return _parse_job(response), _retry_after(response)

    def cancel(self, job_id: str) -> Job:
        """Queued: canceled at once. Running: stops at the next denoising step (the job says so soon after).

        A finished job raises :class:`DarkroomError` with code ``job_already_finished`` (409).
        """
        return _parse_job(self._http.post(_job_path(job_id, "/cancel")))

    def events(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events from one connection: ``status`` and ``progress``, then ``job``; then it ends.

        It does not reconnect: :meth:`wait` does that (resuming from the last event id). Pass
        ``last_event_id`` to resume a stream yourself.
        """
        with self._event_stream(job_id, last_event_id, SSE_READ_TIMEOUT_S) as response:
            decoder = SSEDecoder()
            for line in response.iter_lines():
                message = decoder.feed(line)
                if message is not None:
                    yield Event.from_sse(message, json.loads(message.data))

    def wait(
        self,
        job: Job | str,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        *,
        poll_interval: float = 0.5,
    ) -> Job:
        """Block until the job finishes (succeeded, failed or canceled) and return it.

        Follows the event stream, resuming after a dropped connection and falling back to polling when
        streaming keeps failing. While the job is queued it polls instead, because the queue position is
        computed on read and never streamed — every ``poll_interval`` seconds, or as much longer as the
        server's ``Retry-After`` hint asks (it scales with the expected wait). ``on_progress`` gets the
        job each time its status, queue position or step changes. Raises :class:`WaitTimeout` (the job
        keeps running) after ``timeout``.
        """
        current, hint = (job, None) if isinstance(job, Job) else self._get_polled(job)
        waiter = _Waiter(self, current, timeout, on_progress, poll_interval)
        waiter.hint = hint
        return waiter.run()

    def download(
        self, image: ImageResult | str, path: str | os.PathLike[str], *, verify: bool = True
    ) -> Path:
        """Save an image (a job's :class:`ImageResult`, or a URL) to ``path``; returns the path.

        The file appears only once complete (written beside it, then renamed), and with ``verify`` its
        SHA-256 must match the job's, else :class:`ChecksumMismatch` and no file.
        """
        if isinstance(image, ImageResult) and image.url is None:
            raise ValueError(
                f"image seed {image.seed} was withheld by the content filter ({image.finish_reason}): "
                "it was never stored, there is nothing to download"
            )
        url = image.url if isinstance(image, ImageResult) else image
        assert url is not None
        expected = image.sha256 if isinstance(image, ImageResult) and verify else None
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        digest = hashlib.sha256()
        try:
            with self._http.stream("GET", url, follow_redirects=True) as response:
                if response.is_error:
                    response.read()
                    raise DarkroomError.from_response(response)
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        digest.update(chunk)
            if expected is not None and digest.hexdigest() != expected:
                raise ChecksumMismatch(url, expected, digest.hexdigest())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    # --- models ------------------------------------------------------------------------------------------

    def list_models(self) -> list[ServedModel]:
        """The models requests may name as ``model``, the server's default first, each with its ready
        workers and waiting jobs (``ready_workers == 0``: its jobs wait until a worker for it starts)."""
        response = self._http.get("/v1/models")
        if response.is_error:
            raise DarkroomError.from_response(response)
        return ModelList.model_validate_json(response.content).data

    def get_model(self, name: str) -> ServedModel:
        """One served model by name, with its ready workers and queues: cheaper than :meth:`list_models`
        when a client only cares whether *its* model has a worker. Not served → ``model_not_found`` (404)."""
        # A hub id keeps its slash (/v1/models/OWNER/NAME); anything else that is special is escaped.
        response = self._http.get(f"/v1/models/{quote(name, safe='/')}")
        if response.is_error:
            raise DarkroomError.from_response(response)
        return ServedModel.model_validate_json(response.content)

    # --- OpenAI-compatible -------------------------------------------------------------------------------

    def create_image(
        self,
        request: ImageGenerationRequest | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        timeout: float = OPENAI_IMAGES_TIMEOUT_S,
    ) -> ImagesResponse:
        """``POST /v1/images/generations``: OpenAI's ``images.generate`` body in, its ``ImagesResponse`` out
        (plus the job ``id``), for code that already speaks OpenAI's shape. The server waits for the job
        (``DARKROOM_OPENAI_IMAGES_WAIT``, 120 s by default) before it answers, so ``timeout`` bounds this call
        as a whole; an unfinished job is ``generation_timeout`` (504) and goes on — repeat the call with the
        same ``idempotency_key`` to wait for it again. :meth:`generate` and :meth:`wait` are the native way.
        """
        response = self._http.post(
            "/v1/images/generations",
            json=_body(request),
            headers=_idempotency(idempotency_key),
            timeout=httpx.Timeout(self.timeout, read=max(self.timeout, timeout)),
        )
        if response.is_error:
            raise DarkroomError.from_response(response)
        return ImagesResponse.model_validate_json(response.content)

    # --- batches -----------------------------------------------------------------------------------------

    def create_batch(self, batch: BatchBody, *, idempotency_key: str | None = None) -> Batch:
        """Submit a batch (``requests``, or a ``template`` with ``seeds`` or ``count``): all items or none.

        Returns it queued (202), with the first page of its items. ``idempotency_key`` works as for
        :meth:`generate`: the same key and body return the same batch, so a retried submission never
        queues a thousand images twice.
        """
        response = self._http.post("/v1/batches", json=_body(batch), headers=_idempotency(idempotency_key))
        return _parse_batch(response)

    def get_batch(self, batch_id: str, *, offset: int = 0, limit: int | None = None) -> Batch:
        """The batch now: ``status`` and ``counts`` over all items, and items with freshly signed URLs.

        ``limit=None`` returns every item from ``offset`` on (following ``next_offset`` page by page, so
        ``next_offset`` is None); an int returns that one page as the server answers it (``limit=0``: no
        items, the cheap read for checking on a batch).
        """
        if limit is not None:
            return self._batch_page(batch_id, offset, limit)
        page = self._batch_page(batch_id, offset, MAX_PAGE)
        items = list(page.items or [])
        while page.next_offset is not None:
            page = self._batch_page(batch_id, page.next_offset, MAX_PAGE)
            items.extend(page.items or [])
        return page.model_copy(update={"items": items, "next_offset": None})

    def cancel_batch(self, batch_id: str) -> Batch:
        """Queued items end at once, running ones at their next denoising step; the batch says
        ``canceled`` once all have. An ended batch raises ``batch_already_finished`` (409)."""
        return _parse_batch(self._http.post(_batch_path(batch_id, "/cancel")))

    def wait_batch(
        self,
        batch: Batch | str,
        timeout: float | None = None,
        on_progress: BatchProgressCallback | None = None,
        *,
        poll_interval: float = 1.0,
    ) -> Batch:
        """Block until every item has ended (``completed`` or ``canceled``); returns it with all its items.

        Polls the batch without its items (the cheap read) every ``poll_interval`` seconds: a batch has no
        event stream, and its items' own streams would be one connection each. ``on_progress`` gets the
        batch whenever its status or counts change. Short outages (503, refused) are ridden out as in
        :meth:`wait`, the final read of every item included. Raises :class:`BatchWaitTimeout` (the items
        go on) after ``timeout`` seconds.
        """
        current = batch if isinstance(batch, Batch) else self._batch_page(batch, 0, 0)
        waiter = _BatchWaiter(self, current, timeout, on_progress, poll_interval)
        waiter.run()
        return waiter.read_all()

    def list_batches(self, offset: int = 0, limit: int = DEFAULT_BATCH_LIST_PAGE) -> BatchList:
        """This API key's batches, newest first: one page (``limit`` 1..100) of their status and counts,
        without items (:meth:`get_batch` one for those); ``next_offset`` is the next page's, None at the end.
        """
        response = self._http.get("/v1/batches", params={"offset": offset, "limit": limit})
        if response.is_error:
            raise DarkroomError.from_response(response)
        return BatchList.model_validate_json(response.content)

    def _batch_page(self, batch_id: str, offset: int, limit: int) -> Batch:
        params = {"offset": offset, "limit": limit}
        return _parse_batch(self._http.get(_batch_path(batch_id), params=params))

    # --- plumbing ----------------------------------------------------------------------------------------

    @contextmanager
    def _event_stream(
        self, job_id: str, last_event_id: str | None, read_timeout: float
    ) -> Iterator[httpx.Response]:
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        timeout = httpx.Timeout(self.timeout, read=read_timeout)
        with self._http.stream(
            "GET", _job_path(job_id, "/events"), headers=headers, timeout=timeout
        ) as response:
            if response.is_error:
                response.read()
                raise DarkroomError.from_response(response)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise _not_a_stream(response)
            yield response


class _StreamEnded(Exception):
    """The event stream closed before the final ``job`` event (a proxy timeout, a server restart)."""


def _apply(job: Job, event: Event) -> Job:
    """The job updated by one event, only ever forwards, so a replayed older event changes nothing.

    A terminal ``status`` event is left for the ``job`` event right behind it: only that (or a fresh read)
    carries the images and errors, and a job marked finished without them would look empty.
    """
    if event.job is not None:
        return event.job
    update: dict[str, Any] = {}
    if event.status is JobStatus.RUNNING and job.status is JobStatus.QUEUED:
        update = {"status": JobStatus.RUNNING, "queue_position": None}
    progress = event.progress
    if progress is not None and (job.progress is None or progress.step > job.progress.step):
        update["progress"] = progress
    return job.model_copy(update=update) if update else job


class _Waiter:
    """One :meth:`DarkroomClient.wait`: the job as last seen, the position in its event stream, the clock."""

    def __init__(
        self,
        client: DarkroomClient,
        job: Job,
        timeout: float | None,
        on_progress: ProgressCallback | None,
        poll_interval: float,
    ) -> None:
        self.client = client
        self.job = job
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_progress = on_progress
        self.poll_interval = poll_interval
        self.last_event_id: str | None = None
        self.stream_failures = 0
        self.finished_unseen = False  # a terminal status arrived but its job event did not
        self.left_queue = False
        self.outage = _Outage(poll_interval)
        self.hint: float | None = None  # the last read's Retry-After: the next poll waits at least that
        self._seen: tuple[object, ...] | None = None

    def run(self) -> Job:
        self._notify()
        while not self.job.status.is_terminal:
            self._check_deadline()
            if self.finished_unseen:
                self._adopt(self._read_job(pause=0.0))
            elif self.stream_failures >= STREAM_FAILURES_BEFORE_POLLING:
                self._adopt(self._read_job(pause=self.poll_interval))
            elif self.job.status is JobStatus.QUEUED and not self.left_queue:
                self._while_queued()
            else:
                self._try_follow()
        return self.job

    def _while_queued(self) -> None:
        """Poll: the queue position is computed on read, never streamed. Once the job has left the queue,
        follow its stream, which replays the run from the start — so even a job that started and finished
        between two polls still reports every step to ``on_progress``."""
        polled = self._read_job(pause=self.poll_interval)
        if polled is None or polled.status is JobStatus.QUEUED:
            self._adopt(polled)
            return
        self.left_queue = True
        if self.on_progress is None:  # nobody watches the steps: this read is as good as the stream
            self._adopt(polled)

    # --- following the stream ----------------------------------------------------------------------------

    def _try_follow(self) -> None:
        try:
            self._follow()
        except (httpx.TransportError, _StreamEnded):
            self.stream_failures += 1
        except DarkroomError as exc:
            if not (exc.retryable or exc.code == "unexpected_response"):
                raise
            self.stream_failures += 1

    def _follow(self) -> None:
        """Read events until the final job arrives; returns early only to tighten the read timeout."""
        remaining = self._remaining()
        read_timeout = (
            SSE_READ_TIMEOUT_S if remaining is None else max(0.1, min(SSE_READ_TIMEOUT_S, remaining))
        )
        with self.client._event_stream(self.job.id, self.last_event_id, read_timeout) as response:
            decoder = SSEDecoder()
            for line in response.iter_lines():
                message = decoder.feed(line)
                if message is not None:
                    event = Event.from_sse(message, json.loads(message.data))
                    self.last_event_id = event.id or self.last_event_id
                    self.finished_unseen = event.status is not None and event.status.is_terminal
                    self.job = _apply(self.job, event)
                    self.stream_failures = 0
                    self._notify()
                    if event.job is not None:
                        return
                self._check_deadline()
                remaining = self._remaining()
                if remaining is not None and read_timeout - remaining > 2.0:
                    return  # reconnect (resuming) with a read timeout that ends at the deadline
        raise _StreamEnded

    # --- polling -----------------------------------------------------------------------------------------

    def _read_job(self, pause: float) -> Job | None:
        """Sleep ``pause`` — or longer, as the previous read's ``Retry-After`` asked (the server scales it
        to the expected wait) — then read the job; None while riding out a short outage (503, refused)."""
        if pause > 0 and self.hint is not None:
            pause = max(pause, self.hint)
        pause = self.outage.pause(pause)
        remaining = self._remaining()
        time.sleep(pause if remaining is None else max(0.0, min(pause, remaining)))
        polled = self.outage.read(lambda: self.client._get_polled(self.job.id))
        if polled is None:
            return None
        job, self.hint = polled
        return job

    def _adopt(self, job: Job | None) -> None:
        if job is not None:
            self.job = job
            self._notify()

    # --- bookkeeping -------------------------------------------------------------------------------------

    def _notify(self) -> None:
        if self.on_progress is None:
            return
        job = self.job
        seen = (job.status, job.queue_position, job.progress.step if job.progress else None)
        if seen != self._seen:
            self._seen = seen
            self.on_progress(job)

    def _remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _check_deadline(self) -> None:
        if self.timeout is not None and (remaining := self._remaining()) is not None and remaining <= 0:
            raise WaitTimeout(self.job, self.timeout)


class _Outage:
    """Riding out a server that answers 503 (or another retryable status) or cannot be reached: a read
    that fails so is skipped (None) for up to ``OUTAGE_TOLERANCE_S``, then the error is raised."""

    def __init__(self, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self.since: float | None = None

    def pause(self, pause: float) -> float:
        """During an outage, no faster than every two poll intervals (at most 5 s): no hammering."""
        return pause if self.since is None else max(pause, min(5.0, 2 * self.poll_interval))

    def read(self, fetch: Callable[[], _T]) -> _T | None:
        try:
            value = fetch()
        except (httpx.TransportError, DarkroomError) as exc:
            if isinstance(exc, DarkroomError) and not exc.retryable:
                raise
            now = time.monotonic()
            self.since = self.since or now
            if now - self.since > OUTAGE_TOLERANCE_S:
                raise
            return None
        self.since = None
        return value


class _BatchWaiter:
    """One :meth:`DarkroomClient.wait_batch`: poll the item-less view until every item has ended."""

    def __init__(
        self,
        client: DarkroomClient,
        batch: Batch,
        timeout: float | None,
        on_progress: BatchProgressCallback | None,
        poll_interval: float,
    ) -> None:
        self.client = client
        self.batch = batch
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_progress = on_progress
        self.poll_interval = poll_interval
        self.outage = _Outage(poll_interval)
        self.hint: float | None = None  # the last read's Retry-After: the next poll waits at least that
        self._seen: tuple[object, ...] | None = None

    def run(self) -> Batch:
        self._notify()
        while not self.batch.status.is_terminal:
            if self.deadline is not None and self.timeout is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise BatchWaitTimeout(self.batch, self.timeout)
                time.sleep(min(self.outage.pause(self.poll_interval), remaining))
            else:
                time.sleep(self.outage.pause(self.poll_interval))
            read = self.outage.read(lambda: self.client._batch_page(self.batch.id, 0, 0))
            if read is not None:
                self.batch = read
                self._notify()
        return self.batch

    def read_all(self) -> Batch:
        """The ended batch with every item, riding out an outage as the polls do. Past the deadline it
        tries once more and lets that error through: the caller's timeout still bounds the wait."""
        while True:
            remaining = None if self.deadline is None else self.deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return self.client.get_batch(self.batch.id)
            read = self.outage.read(lambda: self.client.get_batch(self.batch.id))
            if read is not None:
                return read
            pause = self.outage.pause(self.poll_interval)
            time.sleep(pause if remaining is None else min(pause, remaining))

    def _notify(self) -> None:
        seen = (self.batch.status, self.batch.counts)
        if self.on_progress is not None and seen != self._seen:
            self._seen = seen
            self.on_progress(self.batch)
