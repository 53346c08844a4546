"""Every Prometheus metric darkroom exports, defined once (``darkroom_*``).

A process exports only the families of its role (``export``): the API at ``/metrics``, GPU and webhook
workers on ``DARKROOM_WORKER_METRICS_PORT``. Every family is defined unregistered, so a process that never
exports a worker family cannot show up on a dashboard as a phantom worker at 0 steps/s; code may still
update any metric, an unexported one is simply not scraped. ``darkroom_generation_jobs_total`` belongs to
every role that ends jobs (the API cancels queued ones, workers finish and recover them).
HTTP metrics are labelled by route *template* (``/v1/generations/{job_id}``), never by raw path, so job ids
cannot explode label cardinality. No ``*_created`` series: nothing reads them, and they double every counter.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase

Role = Literal["api", "worker", "webhooks"]

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

HTTP_REQUESTS = Counter(
    "darkroom_http_requests_total",
    "HTTP requests answered by the API.",
    ["method", "route", "status"],
    registry=None,
)
HTTP_LATENCY = Histogram(
    "darkroom_http_request_duration_seconds",
    "Time to answer an HTTP request (SSE streams excluded).",
    ["method", "route"],
    buckets=_SECONDS_BUCKETS,
    registry=None,
)
SUBMISSIONS = Counter(
    "darkroom_generation_submissions_total",
    "Generation submissions, by outcome (accepted, idempotent_replay, rejected).",
    ["outcome"],
    registry=None,
)
QUEUE_WAIT = Histogram(
    "darkroom_generation_queue_wait_seconds",
    "Time from submission to a worker starting the job.",
    buckets=_SECONDS_BUCKETS,
    registry=None,
)
RUN_TIME = Histogram(
    "darkroom_generation_run_seconds",
    "Time a worker spent on a job, from start to terminal state.",
    ["outcome"],
    buckets=_SECONDS_BUCKETS,
    registry=None,
)
STEP_TIME = Histogram(
    "darkroom_generation_step_seconds",
    "Time of one denoising step.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=None,
)
JOBS = Counter(
    "darkroom_generation_jobs_total",
    "Jobs that reached a terminal state, by outcome.",
    ["outcome"],
    registry=None,
)
IMAGES = Counter("darkroom_generation_images_total", "Images generated and stored.", registry=None)
IMAGES_FILTERED = Counter(
    "darkroom_generation_images_filtered_total",
    "Images the content classifier withheld (reported as content_filtered, never stored).",
    registry=None,
)
# ``model``: the served model a queue or worker belongs to ("" for the webhook queue), so each model's
# workers scale on their own backlog (deploy/k8s/base/worker-scaledobject.yaml).
QUEUE_DEPTH = Gauge("darkroom_queue_depth", "Jobs waiting in the queue.", ["queue", "model"], registry=None)
JOBS_RUNNING = Gauge(
    "darkroom_generation_jobs_running", "Jobs running in this worker process.", ["model"], registry=None
)
WORKER_READY = Gauge(
    "darkroom_worker_ready", "1 once this worker's model is loaded and warm.", ["model"], registry=None
)
STORAGE_WRITES_REFUSED = Counter(
    "darkroom_storage_writes_refused_total",
    "Uploads the storage refused until an operator acts (no_space, quota_exceeded, read_only, "
    "file_too_large); each failed its job at once with storage_error.",
    ["reason"],
    registry=None,
)
WEBHOOK_ATTEMPTS = Counter(
    "darkroom_webhook_attempts_total",
    "Webhook delivery attempts, by outcome (delivered, retry, failed, gone).",
    ["outcome"],
    registry=None,
)
OUTBOX_BACKLOG = Gauge(
    "darkroom_outbox_backlog",
    "Webhook events written by status changes and not yet turned into deliveries by a webhook process.",
    registry=None,
)
# The API waits for replicas after admissions, GPU workers after job ends (the webhook process does neither).
REPLICA_ACK_TIMEOUTS = Counter(
    "darkroom_redis_replica_ack_timeouts_total",
    "Writes that fewer than DARKROOM_REDIS_MIN_REPLICA_ACKS replicas acknowledged in time (Redis WAIT), "
    "by what was written (admission: answered 503; job_end: logged, the worker went on).",
    ["write"],
    registry=None,
)

#: The families each kind of process exports.
ROLES: Mapping[Role, tuple[MetricWrapperBase, ...]] = {
    "api": (
        HTTP_REQUESTS,
        HTTP_LATENCY,
        SUBMISSIONS,
        QUEUE_DEPTH,
        OUTBOX_BACKLOG,
        JOBS,
        REPLICA_ACK_TIMEOUTS,
    ),
    "worker": (
        QUEUE_WAIT,
        RUN_TIME,
        STEP_TIME,
        JOBS,
        IMAGES,
        IMAGES_FILTERED,
        JOBS_RUNNING,
        WORKER_READY,
        STORAGE_WRITES_REFUSED,
        REPLICA_ACK_TIMEOUTS,
    ),
    "webhooks": (WEBHOOK_ATTEMPTS,),
}

_lock = threading.Lock()
_exported: dict[int, set[int]] = {}  # id(registry) -> ids of the collectors registered in it


def export(*roles: Role, registry: CollectorRegistry = REGISTRY) -> None:
    """Register ``roles``' families in ``registry`` (the default one, which ``/metrics`` and
    ``start_http_server`` serve along with the process and GC collectors) and turn ``*_created`` series off.
    Idempotent: a family shared by two roles, or a second call, registers once."""
    disable_created_metrics()
    with _lock:
        done = _exported.setdefault(id(registry), set())
        for role in roles:
            for family in ROLES[role]:
                if id(family) not in done:
                    registry.register(family)
                    done.add(id(family))
