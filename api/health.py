"""Probes and metrics: ``/healthz`` (alive), ``/readyz`` (Redis takes writes), ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.contract import problem_responses
from api.deps import StateDep
from api.errors import REDIS_FULL_RETRY_AFTER_S, ServiceUnavailable
from services import metrics
from services.clients import out_of_memory
from services.jobs import outbox

router = APIRouter(tags=["health"])
_READY_TIMEOUT_S = 2.0
READY_PROBE_KEY = "darkroom:readyz-probe"
"""Written (with a 10 s expiry) by every ``/readyz``: the cheapest proof that Redis still takes writes."""


@router.get(
    "/healthz",
    summary="Liveness: the process answers",
    operation_id="healthz",
    responses=problem_responses(500),
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: Redis answers and takes writes",
    operation_id="readyz",
    responses=problem_responses(
        500,
        503,
        described={
            503: "Redis does not answer (`redis_unavailable`) or, at `maxmemory`, refuses writes "
            "(`redis_out_of_memory`)."
        },
    ),
)
async def readyz(state: StateDep) -> dict[str, str]:
    """Ready when a small write succeeds: a Redis at ``maxmemory`` (``noeviction``) still answers PING and
    reads, but every submission would fail, so the load balancer should stop sending them here.
    A write rather than ``INFO memory``: it also catches a read-only replica, and needs no threshold."""
    try:
        await asyncio.wait_for(
            state.redis_async.set(READY_PROBE_KEY, b"1", px=10_000), timeout=_READY_TIMEOUT_S
        )
    except Exception as exc:
        if out_of_memory(exc):
            raise ServiceUnavailable(
                code="redis_out_of_memory",
                detail="Redis is at maxmemory and refuses writes",
                retry_after=REDIS_FULL_RETRY_AFTER_S,
            ) from None
        raise ServiceUnavailable(code="redis_unavailable", detail="Redis is not reachable") from None
    return {"status": "ready"}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    operation_id="metrics",
    response_class=Response,
    response_description="Prometheus text exposition format.",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **problem_responses(500),
    },
)
async def prometheus_metrics(state: StateDep) -> Response:
    def refresh_queue_depths() -> None:
        redis = state.clients.redis
        queues = [(q, line.model) for line in state.lines.values() for q in (line.queue, line.batch_queue)]
        for queue, model in (*queues, (state.webhook_queue, "")):
            metrics.QUEUE_DEPTH.labels(queue.name, model).set(int(redis.llen(queue.key)))
        metrics.OUTBOX_BACKLOG.set(outbox.backlog(redis))

    try:
        await run_in_threadpool(refresh_queue_depths)
    except Exception:  # metrics must still be served while Redis is down
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
