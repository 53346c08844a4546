"""Every Prometheus metric darkroom exports, defined once (``darkroom_*``) and shared by all processes.

Each process exposes its own registry: the API at ``/metrics``, workers on ``DARKROOM_WORKER_METRICS_PORT``.
HTTP metrics are labelled by route *template* (``/v1/generations/{job_id}``), never by raw path, so job ids
cannot explode label cardinality.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

HTTP_REQUESTS = Counter(
    "darkroom_http_requests_total", "HTTP requests answered by the API.", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "darkroom_http_request_duration_seconds",
    "Time to answer an HTTP request (SSE streams excluded).",
    ["method", "route"],
    buckets=_SECONDS_BUCKETS,
)
SUBMISSIONS = Counter(
    "darkroom_generation_submissions_total",
    "Generation submissions, by outcome (accepted, idempotent_replay, rejected).",
    ["outcome"],
)
QUEUE_WAIT = Histogram(
    "darkroom_generation_queue_wait_seconds",
    "Time from submission to a worker starting the job.",
    buckets=_SECONDS_BUCKETS,
)
RUN_TIME = Histogram(
    "darkroom_generation_run_seconds",
    "Time a worker spent on a job, from start to terminal state.",
    ["outcome"],
    buckets=_SECONDS_BUCKETS,
)
STEP_TIME = Histogram(
    "darkroom_generation_step_seconds",
    "Time of one denoising step.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
JOBS = Counter(
    "darkroom_generation_jobs_total", "Jobs that reached a terminal state, by outcome.", ["outcome"]
)
IMAGES = Counter("darkroom_generation_images_total", "Images generated and stored.")
IMAGES_FILTERED = Counter(
    "darkroom_generation_images_filtered_total",
    "Images the content classifier withheld (reported as content_filtered, never stored).",
)
# ``model``: the served model a queue or worker belongs to ("" for the webhook queue), so each model's
# workers scale on their own backlog (deploy/k8s/base/worker-scaledobject.yaml).
QUEUE_DEPTH = Gauge("darkroom_queue_depth", "Jobs waiting in the queue.", ["queue", "model"])
JOBS_RUNNING = Gauge("darkroom_generation_jobs_running", "Jobs running in this worker process.", ["model"])
WORKER_READY = Gauge("darkroom_worker_ready", "1 once this worker's model is loaded and warm.", ["model"])
WEBHOOK_ATTEMPTS = Counter(
    "darkroom_webhook_attempts_total",
    "Webhook delivery attempts, by outcome (delivered, retry, failed, gone).",
    ["outcome"],
)
OUTBOX_BACKLOG = Gauge(
    "darkroom_outbox_backlog",
    "Webhook events written by status changes and not yet turned into deliveries by a webhook process.",
)
