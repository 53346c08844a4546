"""The webhook worker process: an RQ worker on the webhook queue, with the scheduler that fires retries,
and the outbox dispatcher (a side thread, and the event loop it hands first attempts to) that turns the
events of status changes into deliveries and sends their first attempts, and the archiver (another side
thread, unless ``DARKROOM_ARCHIVER_IN_WEBHOOK_PROCESS`` is false and ``python -m services.archiver`` runs
apart) that moves finished jobs out of Redis once their webhooks are settled.

Why threads in one process (``services.rq_workers.PooledWorker``): an attempt is a few milliseconds of our
work around one HTTP exchange that may wait up to the attempt deadline on a slow receiver. One attempt at
a time let a receiver that hangs or trickles its answer delay every other tenant's webhooks; now up to
``DARKROOM_WEBHOOK_CONCURRENCY`` retries are in flight, each in its own thread, of which one receiver's
host gets at most ``DARKROOM_WEBHOOK_PER_HOST`` (``services.webhooks.hosts``) and each ends within
``DARKROOM_WEBHOOK_ATTEMPT_DEADLINE`` (``services.webhooks.deadline``). No fork per task: it would cost
more than the task and rebuild the Redis, storage and httpx clients every time; this process never
imports torch. Each retry is one RQ task, so RQ keeps its record, its timeout (a backstop) and its
failure callback, which records and retries an attempt that failed however it failed. First attempts —
nearly all deliveries — skip RQ: up to ``DARKROOM_WEBHOOK_DISPATCH_CONCURRENCY`` of them wait on their
receivers at once in one event loop (``services.webhooks.first_attempts``), under the same shares and
deadline, and the outbox entry left unacknowledged until the attempt is recorded stands for RQ's record
(``services.webhooks.dispatcher``).

Attempts that found their share busy are parked in Redis (``services.webhooks.parking``); a side thread puts
them back on the queue as this process has free slots of their share.

``with_scheduler=True`` is required: retries are enqueued with ``enqueue_in`` and only a scheduler moves
them to the queue when due. With several workers, one holds the scheduler lock and the others stand by.

SIGTERM is a warm shutdown: no new attempt starts, those in flight (retries, then first attempts) finish
and are recorded, then the process exits 0.
A Redis restart is waited out (``services.rq_workers``), scheduler included; should the loop still end on
its own, the process exits 1 so its supervisor restarts it.
"""

from __future__ import annotations

import logging

import structlog
from prometheus_client import start_http_server
from rq.serializers import JSONSerializer

from services import metrics
from services.clients import build_clients, close_process_clients, make_redis, set_process_clients
from services.jobs.archiver import Archiver, file_root
from services.logging import configure_logging
from services.queue import webhook_queue
from services.rq_workers import PooledWorker, hold_stop_signals
from services.settings import Settings
from services.webhooks.dispatcher import OutboxDispatcher
from services.webhooks.first_attempts import FirstAttemptSender, share_wait_s
from services.webhooks.parking import Releaser
from services.webhooks.scheduling import task_timeout
from services.webhooks.tasks import DeliveryContext

log = structlog.get_logger(__name__)


def setup_logging(settings: Settings) -> None:
    """Darkroom's structured logs on stderr, minus httpx's per-request line: it would print every
    receiver's URL, query string included, which is where some receivers put their token. Our own
    ``webhook.attempt`` line says what happened without the URL."""
    configure_logging(settings.environment)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def run_worker(settings: Settings, *, burst: bool = False) -> int:
    """Work the webhook queue until SIGTERM/SIGINT (or, with ``burst``, until it is empty); exit status.

    In burst mode the scheduler runs once at start: retries that are not yet due stay scheduled; finished
    jobs whose webhooks are then settled are archived before it returns.
    Call ``setup_logging`` first.
    """
    if settings.outbox_claim_idle <= settings.webhook_attempt_deadline:
        # A first attempt's outbox entry stays unacknowledged while it is sent: another process may claim
        # it after claim_idle and send it again (same webhook-id) while the first is still waiting.
        log.warning(
            "webhooks.claim_idle_not_above_attempt_deadline",
            outbox_claim_idle_s=settings.outbox_claim_idle.total_seconds(),
            attempt_deadline_s=settings.webhook_attempt_deadline.total_seconds(),
        )
    clients = build_clients(settings)
    # Every sending thread may be in a Redis command at once; redis-py's pool refuses a 101st connection
    # ("Too many connections") by default, which would fail attempts for want of a socket.
    pool = clients.redis.connection_pool
    pool.max_connections = max(
        pool.max_connections, settings.webhook_dispatch_concurrency + settings.webhook_concurrency + 8
    )
    set_process_clients(clients)  # what ``deliver_webhook`` will use in this process
    metrics.export("webhooks")
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port)
        log.info("metrics.listening", port=settings.worker_metrics_port)
    # RQ gets its own connection: it raises the socket timeout for its blocking dequeue, which our store's
    # ordinary commands should not inherit.
    connection = make_redis(settings.redis_url, socket_timeout=None)
    # The outbox dispatcher feeds the queue this worker serves: each event a status change appended
    # becomes a delivery record and a first attempt. Its blocking reads get a connection of their own.
    dispatcher = OutboxDispatcher(
        redis=make_redis(settings.redis_url),
        store=clients.store,
        queue=webhook_queue(clients.redis, settings),
        task_timeout=task_timeout(settings.webhook_attempt_deadline),
        claim_idle=settings.outbox_claim_idle,
    )
    ctx = DeliveryContext.from_clients(clients)
    # First attempts: sent from one event loop, recorded and acknowledged in batches.
    dispatcher.sender = FirstAttemptSender(
        ctx,
        on_acknowledged=dispatcher.count_acknowledged,
        concurrency=settings.webhook_dispatch_concurrency,
        share_wait_s=share_wait_s(settings.outbox_claim_idle, settings.webhook_attempt_deadline),
        timeout_s=settings.webhook_timeout.total_seconds(),
        redis_retry_deadline_s=settings.outbox_claim_idle.total_seconds() / 2,
    )
    # Finished jobs whose webhooks are settled go to storage and leave Redis (services.jobs.archiver).
    archiver = Archiver(
        redis=clients.redis,
        archive=clients.archive,
        finished_ttl=settings.finished_ttl,
        sweep_root=file_root(clients.storage),
    )
    # Attempts parked behind a busy share go back on the queue as this process has room for them.
    releaser = Releaser(
        clients.redis,
        ctx.queue,
        {scope: limiter for scope, limiter in (("host", ctx.limiter), ("key", ctx.key_limiter)) if limiter},
        task_timeout=ctx.task_timeout,
    )
    archiving = settings.archiver_in_webhook_process
    hold_stop_signals()  # attempts start before RQ's loop does: a SIGTERM meanwhile is a warm shutdown too
    if burst:  # what is in the outbox now becomes attempts, then the worker drains them
        dispatcher.drain()
    else:
        dispatcher.start()
        releaser.start()
        if archiving:
            archiver.start()
    try:
        worker = PooledWorker(
            [webhook_queue(connection, settings)],
            connection=connection,
            serializer=JSONSerializer,
            concurrency=settings.webhook_concurrency,
        )
        worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
        if burst and archiving:  # what the attempts settled can leave Redis now
            while archiver.run_once():
                pass
    finally:
        releaser.stop()
        if archiving:
            archiver.stop()
        dispatcher.stop(attempts_timeout_s=settings.webhook_attempt_deadline.total_seconds() + 30)
        dispatcher.redis.close()
        connection.close()
        close_process_clients()
    if not burst and not worker.stopped_on_request:
        log.error("webhook_worker.stopped_unexpectedly")
        return 1
    log.info("webhook_worker.stopped")
    return 0
