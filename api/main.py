"""The API app: ``uvicorn api.main:app``.

Thin by design — validate, enqueue, read — and it never imports torch: work reaches the GPU workers only
as a dotted task path on the queue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import redis.asyncio as aredis
from fastapi import FastAPI
from redis import Redis

from api import files, health, models, openai_images
from api.auth import ApiKeyMiddleware
from api.batches.routes import router as batches_router
from api.contract import install_contract
from api.errors import install_error_handlers
from api.generations.events import READ_TIMEOUT_S
from api.generations.routes import router as generations_router
from api.middleware import BodySizeLimitMiddleware, MetricsMiddleware, RequestContextMiddleware
from api.playground import router as playground_router
from api.state import AppState, ModelLine
from api.waits import Waits, watch_shutdown
from api.webhook_docs import install_webhook_docs
from services import metrics
from services.admission import Admitter, BatchAdmitter
from services.api_keys import KeyRing
from services.clients import build_clients, make_async_redis
from services.content_safety import PromptFilter
from services.jobs.unserved import UnservedSweep
from services.logging import configure_logging
from services.queue import batch_queue, generation_queue, webhook_queue
from services.rate_limit import BATCH_BUCKETS, READ_BUCKETS, RateLimit, TokenGate
from services.settings import Settings, get_settings

# JSON bodies carry at most an init image (10 MB decoded, ~13.4 MB as base64) plus the prompt.
MAX_BODY_BYTES = 15 * 1024 * 1024


# Where an API runs is the operator's choice: a templated server lets generators and Swagger UI take the
# address as a variable, defaulting to `make run`'s.
SERVERS = [
    {
        "url": "{scheme}://{host}",
        "description": "A darkroom API (default: `make run` on this machine).",
        "variables": {
            "scheme": {"default": "http", "enum": ["http", "https"]},
            "host": {"default": "localhost:8000", "description": "Host and port of the API."},
        },
    }
]
TAGS = [
    {"name": "generations", "description": "Submit, read, cancel and follow one generation job."},
    {
        "name": "batches",
        "description": "Up to 1,000 generation jobs submitted, followed and canceled as one.",
    },
    {"name": "images", "description": "OpenAI's Images API over generation jobs, for the `openai` SDKs."},
    {"name": "models", "description": "The served models and the workers ready for each."},
    {"name": "files", "description": "Image downloads from local (`file://`) storage, by signed URL."},
    {"name": "health", "description": "Probes and Prometheus metrics for operators; no API key."},
]


def load_keys(settings: Settings) -> KeyRing | None:
    """The API keys, or None when auth is explicitly off; refuses to start with neither."""
    if settings.auth_disabled:
        return None
    keys = KeyRing.load(settings.api_keys, settings.api_keys_file)
    if not keys:
        raise RuntimeError(
            "no API keys configured: set DARKROOM_API_KEYS or DARKROOM_API_KEYS_FILE (mint one with "
            "`python -m services.api_keys NAME`), or DARKROOM_AUTH_DISABLED=true for local development"
        )
    return keys


def model_line(
    model: str,
    redis: Redis,
    redis_async: aredis.Redis,
    settings: Settings,
    batch_tokens: RateLimit | None,
) -> ModelLine:
    """``model``'s queues and admission scripts. One batch-token bucket for all of them: a key's budget is
    its own, whichever model it asks for. (A submission's own token is taken before its body is
    validated, by ``api.limits``, not here.)"""
    queue = generation_queue(redis, settings, model)
    batches = batch_queue(redis, settings, model)
    return ModelLine(
        model=model,
        queue=queue,
        batch_queue=batches,
        admitter=Admitter(redis_async, queue, settings, None),
        batch_admitter=BatchAdmitter(redis_async, batches, settings, batch_tokens),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``settings`` defaults to the environment (tests pass their own)."""
    metrics.export("api")  # /metrics serves the API's families only

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or get_settings()
        configure_logging(resolved.environment)
        keys = load_keys(resolved)
        prompt_filter = PromptFilter.from_settings(resolved)  # a bad blocklist stops start-up
        clients = build_clients(resolved)
        # Event streams block in XREAD for at most a few seconds at a time, so a socket timeout just above
        # that bounds every call: SSE and ``Prefer: wait`` never hang on a Redis that stopped answering.
        redis_async = make_async_redis(resolved.redis_url, socket_timeout=READ_TIMEOUT_S)
        # Waits block on a pool of their own, as large as the waits this process admits (api/waits.py):
        # however many are open, the pool above still serves every GET, POST and /readyz.
        waits = Waits(
            redis=redis_async,
            blocking=make_async_redis(  # owns its pool: aclose() closes it
                resolved.redis_url,
                socket_timeout=READ_TIMEOUT_S,
                max_connections=resolved.max_waits,
                blocking=True,
            ),
            per_key=resolved.max_waits_per_key,
            per_process=resolved.max_waits,
        )
        rate_limit = (
            RateLimit(resolved.rate_limit_per_minute, resolved.rate_limit_burst)
            if resolved.rate_limit_per_minute
            else None
        )
        read_limit = (
            RateLimit(resolved.read_rate_limit_per_minute, resolved.read_rate_limit_burst, READ_BUCKETS)
            if resolved.read_rate_limit_per_minute
            else None
        )
        batch_tokens = (
            RateLimit(resolved.batch_items_per_minute, resolved.batch_items_burst, BATCH_BUCKETS)
            if resolved.batch_items_per_minute
            else None
        )
        app.state.darkroom = AppState(
            settings=resolved,
            clients=clients,
            redis_async=redis_async,
            lines={
                model: model_line(model, clients.redis, redis_async, resolved, batch_tokens)
                for model in resolved.accepted_models
            },
            webhook_queue=webhook_queue(clients.redis, resolved),
            keys=keys,
            prompt_filter=prompt_filter,
            submit_gate=TokenGate(redis_async, rate_limit) if rate_limit else None,
            read_gate=TokenGate(redis_async, read_limit) if read_limit else None,
            image_limiter=anyio.CapacityLimiter(resolved.image_decode_threads),
            waits=waits,
        )
        # Jobs queued for a model nobody serves any more fail instead of waiting forever.
        sweep = UnservedSweep(clients.redis, clients.lifecycle, resolved)
        sweep.start()
        waits.start()
        try:
            with watch_shutdown(waits.shutdown):  # waits end at SIGTERM, not after the graceful timeout
                yield
        finally:
            await waits.stop()
            await sweep.stop()
            await waits.blocking.aclose()
            await redis_async.aclose()
            clients.close()

    app = FastAPI(
        title="darkroom",
        version="0.1.0",
        summary="Self-hosted Stable Diffusion 3.5 Medium text-to-image service.",
        license_info={"name": "Apache-2.0", "identifier": "Apache-2.0"},
        servers=SERVERS,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(generations_router)
    app.include_router(batches_router)
    app.include_router(openai_images.router)
    app.include_router(models.router)
    app.include_router(files.router)
    app.include_router(health.router)
    app.include_router(playground_router)
    install_webhook_docs(app)
    install_contract(app)
    # Added innermost first. On the way in: request id and logging see everything, metrics see the route
    # (401s included), then the key check, then the body-size guard.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(ApiKeyMiddleware)
    app.add_middleware(MetricsMiddleware)
    # Successful probes and scrapes (make run polls /readyz while the worker loads) are logged at DEBUG.
    app.add_middleware(RequestContextMiddleware, quiet_routes=("/healthz", "/readyz", "/metrics"))
    return app


app = create_app()
