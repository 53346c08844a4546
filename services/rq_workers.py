"""RQ workers that ride out a Redis restart instead of quitting: the base of both of our worker processes.

Out of the box RQ waits for Redis only inside its blocking dequeue. A Redis error anywhere else — the
heartbeat after a job, the suspension check, the bookkeeping around a job, the state written on SIGTERM,
the registration at start — reaches the bare ``except`` of ``Worker.work`` (or escapes ``bootstrap``) and
the worker *quits* (exit 0, or 1 on a traceback while registering its death); the scheduler process that
fires delayed jobs (our webhook retries) dies on the first error and is only restarted by a maintenance
pass minutes later. So a Redis restart used to take
every worker down with it.

:class:`ResilientWorker` waits for Redis at each of those places (backoff capped at 2 s, until a stop is
requested), puts back a job whose bookkeeping Redis cut short, and starts a :class:`ResilientScheduler`,
whose loop survives Redis errors too. Tasks must tolerate being run again (ours check their record first).
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog
from redis.connection import AbstractConnection
from rq import SimpleWorker
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.scheduler import RQScheduler
from rq.suspension import WORKERS_SUSPENDED
from rq.timeouts import TimerDeathPenalty
from rq.worker import WorkerStatus

from services.clients import REDIS_UNAVAILABLE, retry_while_redis_down

T = TypeVar("T")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
log = structlog.get_logger(__name__)
_stop_signals_before_work: list[int] = []  # what ``hold_stop_signals`` caught, for the worker to act on


def hold_stop_signals() -> None:
    """Catch SIGTERM/SIGINT until a worker's ``work()`` installs RQ's own handlers, which then act on them.

    A process that starts side work (the webhook dispatcher) before ``work()`` can be told to stop while
    RQ still registers itself; with the default handler that signal killed it on the spot, in the middle
    of an attempt, instead of a warm shutdown. A child forked meanwhile (RQ's scheduler, which installs
    its own handlers a moment later) gets the default: the signal stops it, as before."""
    owner = os.getpid()

    def remember(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _stop_signals_before_work.append(signum)

    signal.signal(signal.SIGTERM, remember)
    signal.signal(signal.SIGINT, remember)


class ResilientScheduler(RQScheduler):
    """RQ's scheduler (a forked process that moves due delayed jobs to their queue), minus dying on the
    first Redis error — and minus outliving its worker.

    The fork inherits the worker's Redis sockets. If the worker is killed (SIGKILL, the OOM killer) while
    it waits in its blocking dequeue, an orphaned scheduler keeps that socket open: Redis still sees the
    dequeue waiting and hands it the next job, which nobody will ever read — it sits in RQ's intermediate
    list until a maintenance pass, minutes later. So the scheduler asks the kernel to stop it with its
    parent (Linux ``PR_SET_PDEATHSIG``; SIGTERM, so that it still releases its lock).

    That left a window — the scheduler's last loop, up to a second or more on a busy machine — in which
    the dead worker's dequeue still took jobs; with a shared Redis a freshly enqueued webhook attempt
    vanished from its queue (tests/services/test_redis_resilience.py). So the first thing the scheduler
    does is close its copies of every Redis connection it inherited (it opens its own): with the worker
    dead, nothing holds its sockets open any more and Redis drops its waiting dequeue at once.

    The same goes for every other socket the worker had open at the fork: a webhook attempt in flight
    in the worker's event loop would stay open in the scheduler after the worker closed it — the
    receiver kept the connection (and the worker, as far as the receiver could tell, more than its
    share of connections) until the scheduler died. So the child lets go of all of them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parent_pid = os.getpid()  # built in the worker, before the fork

    def work(self) -> None:
        _die_with(self._parent_pid)
        _close_inherited_redis_connections()
        _release_inherited_sockets()
        retry_while_redis_down(
            super().work, what="rq scheduler loop", should_stop=lambda: bool(self._stop_requested)
        )


def _close_inherited_redis_connections() -> None:
    """In a forked child: close this process's copy of every Redis connection its parent had open.

    ``disconnect()`` in a process other than the one that connected only closes the file descriptor (no
    ``shutdown``), so the parent's connections are untouched while it lives."""
    pid = os.getpid()
    for obj in gc.get_objects():
        if isinstance(obj, AbstractConnection) and obj.pid != pid:
            try:
                obj.disconnect()
            except Exception:  # best effort: a connection that will not close stays as before
                log.debug("inherited redis connection not closed", exc_info=True)


def _release_inherited_sockets() -> None:
    """In a forked child: drop this process's copy of every socket it inherited (beyond stdin, stdout
    and stderr), so that what the parent closes is closed.

    Each is replaced by ``/dev/null`` (``dup2``) rather than closed: Python objects of the parent's still
    name those descriptor numbers and close them when collected, which must not hit a socket this
    process opens later under a reused number. Linux only (``/proc/self/fd``); elsewhere a no-op."""
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for name in os.listdir(fd_dir):
            fd = int(name)
            if fd <= 2 or fd == null:
                continue
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(null, fd, inheritable=False)
            except OSError:  # the directory's own descriptor, gone by now
                continue
    finally:
        os.close(null)


def _die_with(parent_pid: int) -> None:
    """In a forked child: get SIGTERM when ``parent_pid`` dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # died before the request took effect
        os._exit(0)


class ResilientWorker(SimpleWorker):
    """A ``SimpleWorker`` that waits for Redis wherever RQ would quit on a Redis error — and that does not
    repeat itself to Redis between two jobs.

    Between the end of one job and the dequeue of the next, RQ's loop beats the worker key four times
    (``HSET`` + two ``EXPIRE`` each: after the job, in the suspension check, before and after the
    dequeue), writes ``state idle`` twice, and runs the suspension check in a ``MULTI``: 18 commands per
    job, a tenth of a job's Redis work, all of it rewriting what Redis already holds. Here a beat is sent
    only when the worker key would otherwise live markedly less than a fresh beat gives it (within
    ``BEAT_SLACK_S``: a dequeue waits ``worker_ttl - 15`` s at most, so the key always outlives it), a
    state already written is not written again, and the suspension check is one ``EXISTS`` (RQ's own
    check runs when the workers are suspended). ``rq info``, ``rq suspend`` and the started registry see
    what they saw before.
    """

    # RQ doubles its wait between failed dequeues up to 60 s; capped, a restarted Redis is noticed in seconds.
    max_connection_wait_time = 5.0
    #: A beat is skipped while the worker key still lives at least ``worker_ttl + 60 - BEAT_SLACK_S`` s.
    BEAT_SLACK_S = 30.0
    #: A "not suspended" read this recently (``suspension_seen``, e.g. in a job's closing MULTI) stands in
    #: for the loop's own check: at most this much later does a worker notice ``rq suspend``.
    SUSPENSION_FRESH_S = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_requested = False  # by a signal: RQ only records it when a job is running
        self._key_lives_until = 0.0  # monotonic: when the worker key expires, as our last beat set it
        self._state_written: str | None = None  # the state Redis holds, as we last wrote it
        self._not_suspended_at = float(
            "-inf"
        )  # monotonic: when Redis last said the workers are not suspended

    @property
    def stopped_on_request(self) -> bool:
        """Whether ``work()`` ended because it was asked to (SIGTERM/SIGINT), not on an error."""
        return self.stop_requested or bool(self._stop_requested)

    def request_stop(self, signum: Any, frame: Any) -> None:
        self.stop_requested = True
        super().request_stop(signum, frame)

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()
        if _stop_signals_before_work:  # asked to stop before the loop began: its first check ends it
            self.stop_requested = True
            self._stop_requested = True

    def wait_for_redis(self, operation: Callable[[], T], what: str) -> T:
        """``operation()``, retried while Redis is unreachable, until it works or a stop is requested."""

        def attempt() -> T:
            try:
                return operation()
            except REDIS_UNAVAILABLE:
                self.forget_beats()  # a restarted Redis may have lost the worker key: write it again
                raise

        return retry_while_redis_down(attempt, what=what, should_stop=lambda: self.stopped_on_request)

    # --- the places where RQ's loop would quit on a Redis error ------------------------------------------

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        ttl = timeout or self.worker_ttl + 60  # what RQ's heartbeat sets
        if pipeline is not None:  # only queues commands on the caller's pipeline: no I/O here
            super().heartbeat(timeout, pipeline=pipeline)
            self._key_lives_until = time.monotonic() + ttl
            return
        if self._key_lives_until - time.monotonic() >= ttl - self.BEAT_SLACK_S:
            return  # beaten moments ago: the key lives about as long as this beat would make it
        parent = super().heartbeat
        self.wait_for_redis(lambda: parent(timeout), "worker heartbeat")
        self._key_lives_until = time.monotonic() + ttl

    def heartbeat_if_due(self) -> None:
        """The worker key's beat from a side thread while a job runs: skipped as :meth:`heartbeat` skips
        it, and tried once — a Redis error reaches the caller instead of holding its thread until Redis is
        back."""
        ttl = self.worker_ttl + 60
        if self._key_lives_until - time.monotonic() >= ttl - self.BEAT_SLACK_S:
            return
        super().heartbeat(ttl)
        self._key_lives_until = time.monotonic() + ttl

    def forget_beats(self) -> None:
        """Redis may have lost the worker key (a restart): the next beat and state are written again."""
        self._key_lives_until = 0.0
        self._state_written = None

    def register_birth(self) -> None:
        # Runs once, in ``bootstrap`` before RQ's loop: a Redis at maxmemory refuses it (one MULTI, so nothing
        # is half-written) and the worker used to exit on it, again and again under its supervisor.
        parent = super().register_birth
        self.wait_for_redis(parent, "register worker")

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if pipeline is not None:  # only queues the command on the caller's pipeline
            super().set_state(state, pipeline=pipeline)
            self._state_written = state
            return
        if state == self._state_written and self._key_lives_until > time.monotonic():
            self._state = state
            return
        parent = super().set_state
        self.wait_for_redis(lambda: parent(state), "set worker state")
        self._state_written = state

    def suspension_seen(self, suspended: bool) -> None:
        """Record a read of RQ's suspension flag made along with other work (one round trip fewer)."""
        self._not_suspended_at = float("-inf") if suspended else time.monotonic()

    def check_for_suspension(self, burst: bool) -> None:
        # One EXISTS while not suspended (RQ's check also beats the worker, in a MULTI); RQ's own when it is.
        if time.monotonic() - self._not_suspended_at < self.SUSPENSION_FRESH_S:
            return
        suspended = self.wait_for_redis(lambda: bool(self.connection.exists(WORKERS_SUSPENDED)), "suspension")
        if not suspended:
            return
        parent = super().check_for_suspension
        self.wait_for_redis(lambda: parent(burst), "check for suspension")

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()
        except REDIS_UNAVAILABLE as exc:  # housekeeping: the next loop tries again
            log.warning("rq maintenance skipped: redis unavailable", error=str(exc))

    def set_shutdown_requested_date(self) -> None:
        # Runs inside the SIGTERM handler, i.e. in the middle of whatever the job is doing: an error here
        # would surface inside the job and fail the very job that SIGTERM means to let finish.
        try:
            super().set_shutdown_requested_date()
        except REDIS_UNAVAILABLE as exc:
            log.warning("shutdown request not recorded: redis unavailable", error=str(exc))

    def teardown(self) -> None:
        try:
            super().teardown()
        except REDIS_UNAVAILABLE as exc:  # the worker's key expires on its own
            log.warning("worker death not recorded: redis unavailable", error=str(exc))

    def _start_scheduler(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        """RQ's own ``_start_scheduler`` with :class:`ResilientScheduler` in place of ``RQScheduler``."""
        self.scheduler = ResilientScheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format,
            log_format=log_format,
            serializer=self.serializer,
        )
        self.scheduler.acquire_locks()
        if not self.scheduler.acquired_locks:  # another worker's scheduler holds the lock
            return
        if burst:
            try:
                self.scheduler.register_birth()
                self.scheduler.enqueue_scheduled_jobs()
            finally:
                self.scheduler.release_locks()
                self.scheduler.register_death()
        else:
            self.scheduler.start()

    # --- running one job ---------------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.execute_job_here(job, queue)

    def execute_job_here(self, job: Job, queue: Queue) -> None:
        """Run ``job`` in this thread, its bookkeeping included, then mark the worker idle."""
        try:
            self.run_job(job, queue)
        except REDIS_UNAVAILABLE as exc:
            # Redis went away under RQ's bookkeeping around the job: RQ could not record the outcome.
            log.error("redis lost around a job; putting it back", job_id=job.id, error=str(exc))
            self.wait_for_redis(lambda: self.requeue_interrupted(job, queue), "put back interrupted job")
        finally:
            self.after_job(job, queue)
        self.set_state(WorkerStatus.IDLE)  # waits for Redis itself

    def run_job(self, job: Job, queue: Queue) -> None:
        """What ``SimpleWorker.execute_job`` does, minus the state change ``execute_job`` makes after it."""
        execution = self.prepare_execution(job)
        self.perform_job(job, queue, execution)

    def requeue_interrupted(self, job: Job, queue: Queue) -> None:
        """Put a job back at the front of its queue after Redis cut its run short (tasks check their own
        record, so a run that did finish is skipped the second time)."""
        job.started_at = None
        job.ended_at = None
        queue.enqueue_job(job, at_front=True)

    def after_job(self, job: Job, queue: Queue) -> None:
        """Hook run after every job, however it ended."""


class PooledWorker(ResilientWorker):
    """A :class:`ResilientWorker` that runs up to ``concurrency`` jobs at once, each in a thread of its own.

    For jobs that mostly wait on the network (webhook attempts): one slow job must not hold up the rest.
    The main thread stays RQ's loop — it takes a free slot, then dequeues one job, records its execution
    (RQ keeps one per running job) and hands it to a thread, which does what ``SimpleWorker`` does: run
    it, record its outcome, call its callbacks. A job is dequeued only when a slot is free, so nothing
    sits taken but idle in this process while another one could run it.

    RQ's SIGALRM timeout works only in the main thread; here it is ``TimerDeathPenalty`` (an exception
    raised in the job's thread), which cannot interrupt a blocking call — jobs bound their own I/O.
    Warm shutdown: on SIGTERM no new job is taken and the ones in flight finish and are recorded before
    the worker unregisters.
    """

    death_penalty_class = TimerDeathPenalty

    def __init__(self, *args: Any, concurrency: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rq-job")
        self._waiting = False  # the main thread waits for a slot or a job: a stop may interrupt it

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        self._waiting = True
        try:
            while not self._slots.acquire(timeout=1.0):
                if self.stopped_on_request:
                    raise StopRequested()
            try:
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except BaseException:
                self._slots.release()
                raise
        finally:
            self._waiting = False
        if result is None:
            self._slots.release()
        return result

    def _shutdown(self) -> None:
        """RQ raises ``StopRequested`` in an idle worker, waits for the job in a busy one; this worker is
        both at once, so: interrupt the main thread only while it waits, and let running jobs finish."""
        self._stop_requested = True
        if self._waiting:
            raise StopRequested()
        self.set_shutdown_requested_date()
        if self.scheduler:
            self.stop_scheduler()

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            self._pool.submit(self._run_in_thread, job, queue)
        except BaseException:
            self._slots.release()
            raise

    def _run_in_thread(self, job: Job, queue: Queue) -> None:
        try:
            self.execute_job_here(job, queue)
        except Exception:  # RQ records a job's own failure; this is its bookkeeping failing
            log.exception("rq job thread failed", job_id=job.id)
        finally:
            self._slots.release()

    def teardown(self) -> None:
        self._pool.shutdown(wait=True)  # jobs in flight finish and are recorded first
        super().teardown()
