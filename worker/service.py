"""The GPU worker process: load the model, then serve the queue one job (or one coalesced group) at a time.

Order matters: the pipeline is loaded and warmed *before* the worker registers with RQ, so a worker that is
listed as alive can take a job at once, and a model that cannot load fails the process instead of jobs.
RQ's ``SimpleWorker`` runs jobs in this process (CUDA state does not survive ``fork``); because a job then
blocks RQ's own loop, :class:`GenerationWorker` keeps heartbeats going from a side thread while it runs —
for the job RQ dequeued and for every coalesced partner the run took with it (``worker.runner``).
SIGTERM is RQ's warm shutdown: the current job finishes, then the process exits 0.

Redis restarts are ridden out rather than fatal (see ``services/rq_workers.py``): the worker waits for
Redis, the runner retries the writes a job cannot do without, and a job whose run the outage cut short is
put back on the queue as soon as Redis answers. Should the loop still end without being asked to, the
process exits 1 so its supervisor restarts it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import start_http_server
from rq.callbacks import execute_success_callback
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.suspension import WORKERS_SUSPENDED
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import WorkerStatus

from services import metrics, rq_records
from services.clients import REDIS_UNAVAILABLE, build_clients, make_redis
from services.content_safety import load_classifier
from services.fleet import Presence
from services.jobs import JobStore, Lifecycle
from services.jobs.recovery import RecoveryLease, recover_lost_jobs, release_interrupted_job
from services.queue import batch_queue, generation_queue
from services.rq_workers import ResilientWorker
from services.settings import Settings
from services.storage import RetryPolicy
from worker import tasks
from worker.cancel_watch import CancelWatch
from worker.coalescing import Coalescing
from worker.engine import GenerationEngine
from worker.pipeline_loader import load_pipeline
from worker.runner import WorkerContext

log = structlog.get_logger(__name__)
EXIT_UNEXPECTED_STOP = 1


class GenerationWorker(ResilientWorker):
    """A Redis-patient SimpleWorker plus a heartbeat thread while a job runs (RQ's own loop is blocked
    meanwhile), and a check after every job that its record was not left stranded by a Redis outage.

    RQ's bookkeeping around a job is cut to what something reads. RQ (``prepare_execution``,
    ``prepare_job_execution``, ``maintain_heartbeats``, ``handle_job_success``) writes an execution record,
    a started-registry entry and the worker's execution set, beats all of them and the job hash every
    heartbeat, then reads the executions back to delete them, watches the job's dependents and checks for
    suspension: ~45 commands in ~15 round trips per job, read only by RQ's own lost-job cleanup — which our
    lifecycle replaces (``darkroom:jobs:running-by-beat``, ``services.jobs.recovery``). Here a job costs RQ
    one pipeline at its start (the job hash's ``started`` fields, the worker's ``busy`` state) and one
    MULTI at its end (the worker's job count and working time, the job hash deleted — or RQ's own result
    and finished registry when the job keeps a result —, ``idle``, and the suspension flag, which spares
    the loop its own check). ``rq info`` (worker states and counts, queue lengths) shows what it showed.
    A job that raises takes RQ's own failure path, unchanged."""

    heartbeat_interval_s: float = 5.0
    on_heartbeat: Any = None  # Callable[[str], None]: extra per-job heartbeat (our job record)
    on_interrupted: Any = None  # Callable[[str], None]: put back a job whose run Redis trouble cut short

    def run_job(self, job: Job, queue: Queue) -> None:
        with self.connection.pipeline() as pipe:
            rq_records.mark_started(pipe, job, self.name)
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            pipe.execute()
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_interval_s):
                try:
                    self.heartbeat_if_due()  # the worker key, when it would not outlive a dequeue
                    if self.on_heartbeat is not None:
                        self.on_heartbeat(job.id)
                except REDIS_UNAVAILABLE as exc:  # expected during a Redis restart; no traceback
                    log.warning("heartbeat failed: redis unavailable", job_id=job.id, error=str(exc))
                except Exception:  # a missed beat must never take the job down
                    log.warning("heartbeat failed", job_id=job.id, exc_info=True)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        thread.start()
        try:
            self._perform(job, queue)
        finally:
            stop.set()
            thread.join(timeout=self.heartbeat_interval_s + 1)

    def _perform(self, job: Job, queue: Queue) -> None:
        """RQ's ``perform_job`` for a job whose start is already recorded, with the short close on success."""
        try:
            timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=job.id):
                return_value = job.perform()
        except BaseException:  # as RQ's ``perform_job``: whatever the job raised, RQ records the failure
            execution = Execution(uuid.uuid4().hex, job.id, self.connection, worker_name=self.name)
            self._finalize_failure(job, queue, execution, sys.exc_info())
            return
        job.ended_at = now()
        execute_success_callback(job, self.death_penalty_class, return_value)
        assert job.started_at is not None
        with self.connection.pipeline() as pipe:
            self.increment_successful_job_count(pipeline=pipe)
            self.increment_total_working_time(job.ended_at - job.started_at, pipe)
            rq_records.close_succeeded(pipe, job, return_value, self.name, self.default_result_ttl)
            self.set_state(WorkerStatus.IDLE, pipeline=pipe)
            pipe.exists(WORKERS_SUSPENDED)
            suspended = pipe.execute()[-1]
        self.suspension_seen(bool(suspended))

    def requeue_interrupted(self, job: Job, queue: Queue) -> None:
        """Nothing blind here: ``after_job`` looks at the job record and requeues only what needs it."""

    def after_job(self, job: Job, queue: Queue) -> None:
        """A run can end with its record still ``running`` under our name (Redis was away for longer than
        the runner retries) or ``queued`` but off the queue (Redis went away between dequeue and claim):
        put it back now rather than leave it to lost-job recovery.

        A run that RQ recorded as finished returned normally: the runner recorded every claimed job's
        outcome (or claimed none), so there is nothing to look at — one read of the record saved per job."""
        if self.on_interrupted is None or job.get_status(refresh=False) == JobStatus.FINISHED:
            return
        try:
            self.wait_for_redis(lambda: self.on_interrupted(job.id), "release interrupted job")
        except REDIS_UNAVAILABLE:  # stopping while Redis is away: lost-job recovery takes over
            log.warning("interrupted job left to lost-job recovery", job_id=job.id)


class RecoveryLoop:
    """Runs lost-job recovery every heartbeat interval from a side thread, for as long as the worker runs.

    Every worker runs the loop, but with a ``holder`` name only the worker holding the fleet's recovery
    lease makes the pass (``services.jobs.recovery.RecoveryLease``: ttl three heartbeat intervals, renewed
    each pass, given back on stop); the others cost Redis one small script call per interval.

    After a Redis outage every running job's heartbeat is stale, its worker alive or not: no worker could
    write one. So once Redis answers again, passes pause for ``lost_after`` — time enough for live workers
    to beat again — instead of taking over (and redoing) jobs that are about to finish.
    """

    def __init__(
        self,
        store: JobStore,
        lifecycle: Lifecycle,
        queue: Queue,
        settings: Settings,
        *,
        holder: str | None = None,
    ) -> None:
        self.store, self.lifecycle, self.queue, self.settings = store, lifecycle, queue, settings
        ttl = 3 * settings.heartbeat_interval
        self.lease = RecoveryLease(store.redis, holder, ttl) if holder is not None else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lost-job-recovery", daemon=True)
        self._outage = False
        self._resume_at: float | None = None

    def run_once(self) -> None:
        try:
            if self._paused_after_outage():
                return
            recover_lost_jobs(
                self.store,
                self.lifecycle,
                self.queue,
                lost_after=self.settings.lost_after,
                max_attempts=self.settings.max_attempts,
                lease=self.lease,
            )
        except REDIS_UNAVAILABLE as exc:
            self._outage = True
            log.warning("lost-job recovery pass skipped: redis unavailable", error=str(exc))
        except Exception:  # a bug or a corrupt record must not kill the worker; the next pass retries
            log.warning("lost-job recovery pass failed", exc_info=True)

    def _paused_after_outage(self) -> bool:
        if self._outage:
            self.store.redis.ping()  # still down: raises, and the outage goes on
            self._outage = False
            pause_s = self.settings.lost_after.total_seconds()
            self._resume_at = time.monotonic() + pause_s
            log.info("redis is back; lost-job recovery pauses", seconds=pause_s)
        return self._resume_at is not None and time.monotonic() < self._resume_at

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval.total_seconds()):
            self.run_once()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and give the lease back, so another worker's next pass need not wait its ttl."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.lease is not None:
            with contextlib.suppress(*REDIS_UNAVAILABLE):  # it expires by itself
                self.lease.release()


def worker_name() -> str:
    """Unique per incarnation: a restarted container keeps hostname and often pid (1), but not this."""
    return f"darkroom-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def run_worker(settings: Settings, *, burst: bool = False) -> int:
    """Load the model, then work the generation queue until told to stop; returns the exit code."""
    clients = build_clients(
        settings, storage_retry=RetryPolicy(deadline_s=settings.storage_retry_deadline.total_seconds())
    )
    metrics.export("worker")
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr="0.0.0.0")
    # Before the model: a classifier that cannot be imported stops the worker at once, not after minutes.
    classifier = load_classifier(settings.image_classifier) if settings.image_classifier else None
    name = worker_name()
    # While the model loads (minutes for the real one), the fleet knows a worker is on its way: the API
    # does not fail its model's queued jobs as stranded meanwhile (services/jobs/unserved.py).
    loading = Presence(
        clients.redis,
        settings.served_model,
        name,
        interval_s=settings.heartbeat_interval.total_seconds(),
        ttl_s=settings.lost_after.total_seconds(),
        loading=True,
    )
    loading.start()
    try:
        model = load_pipeline(settings)
        engine = GenerationEngine(model)
        if settings.warmup:
            log.info("warming up", seconds=round(engine.warm_up(), 3))
    except BaseException:
        loading.stop()  # cannot load (the process exits): withdrawn now, not after its ttl
        raise
    context = WorkerContext(
        engine=engine,
        store=clients.store,
        lifecycle=clients.lifecycle,
        storage=clients.storage,
        worker_name=name,
        progress_interval=settings.progress_interval,
        redis_retry_deadline=settings.redis_retry_deadline,
        coalescing=Coalescing(
            max_jobs=settings.coalesce_max,
            linger=settings.coalesce_linger,
            lookahead=settings.coalesce_lookahead,
            generation_queue=generation_queue(clients.redis, settings),
            batch_queue=batch_queue(clients.redis, settings),
        ),
        image_classifier=classifier,
        model=settings.served_model,
    )
    # Cancel requests reach the worker on its own channel: its denoising loop never asks Redis per step.
    context.cancels = CancelWatch(clients.redis, clients.lifecycle, name)
    context.cancels.start()
    tasks.install_context(context)
    metrics.JOBS_RUNNING.labels(settings.served_model).set(0)  # the series exists before the first job
    metrics.WORKER_READY.labels(settings.served_model).set(1)
    ready_file = Path(settings.ready_file) if settings.ready_file else None
    if ready_file is not None:
        ready_file.write_text(name)
    # RQ gets a connection of its own: it raises the socket timeout for its blocking dequeue (minutes),
    # which the job store's ordinary commands must not inherit.
    connection = make_redis(settings.redis_url, socket_timeout=None)
    worker = GenerationWorker(
        # In this order: RQ serves the first queue that has a job, so batch items wait for interactive ones.
        [generation_queue(connection, settings), batch_queue(connection, settings)],
        connection=connection,
        serializer=JSONSerializer,
        name=name,
    )
    worker.heartbeat_interval_s = settings.heartbeat_interval.total_seconds()
    # Every job the run holds gets a beat (and a release): the one RQ dequeued and its coalesced partners.
    worker.on_heartbeat = lambda job_id: clients.lifecycle.beat({job_id, *context.held_jobs()}, name)

    def release(job_id: str) -> None:
        for held in sorted({job_id, *context.held_jobs()}):
            release_interrupted_job(
                clients.store,
                clients.lifecycle,
                worker.queues[0],
                held,
                worker_name=name,
                max_attempts=settings.max_attempts,
            )
            context.let_go(held)

    worker.on_interrupted = release
    recovery = RecoveryLoop(clients.store, clients.lifecycle, worker.queues[0], settings, holder=name)
    recovery.run_once()  # before the first job: pick up what a previous incarnation of us left running
    recovery.start()
    presence = Presence(
        clients.redis,
        settings.served_model,
        name,
        interval_s=settings.heartbeat_interval.total_seconds(),
        ttl_s=settings.lost_after.total_seconds(),
    )
    presence.start()
    loading.stop()  # only now: never a moment with the worker neither loading nor ready
    log.info(
        "worker ready",
        model=settings.served_model,
        queues=[queue.name for queue in worker.queues],
        source=model.source,
        device=str(model.device),
        name=name,
    )
    try:
        worker.work(burst=burst, logging_level="INFO", with_scheduler=False)
    finally:
        presence.stop()
        recovery.stop()
        metrics.WORKER_READY.labels(settings.served_model).set(0)
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
        tasks.install_context(None)
        context.cancels.close()
        connection.close()
        clients.close()
    if not burst and not worker.stopped_on_request:
        # RQ's loop ends on its own only on an error it could not handle (logged above): let the
        # supervisor restart us rather than report a clean exit.
        log.error("worker loop ended without a stop request")
        return EXIT_UNEXPECTED_STOP
    return 0
