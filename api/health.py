"""Probes and metrics: ``/healthz`` (alive), ``/readyz`` (Redis reachable), ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.contract import problem_responses
from api.deps import StateDep
from api.errors import ServiceUnavailable
from services import metrics
from services.jobs import outbox

router = APIRouter(tags=["health"])
_READY_TIMEOUT_S = 2.0


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
    summary="Readiness: Redis answers",
    operation_id="readyz",
    responses=problem_responses(500, 503, described={503: "Redis does not answer (`redis_unavailable`)."}),
)
async def readyz(state: StateDep) -> dict[str, str]:
    try:
        await asyncio.wait_for(state.redis_async.ping(), timeout=_READY_TIMEOUT_S)
    except Exception:
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
