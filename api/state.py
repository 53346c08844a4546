"""What the API process holds for its lifetime, created in the lifespan and handed out by dependencies."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aredis
from rq import Queue

from services.api_keys import KeyRing
from services.clients import ServiceClients
from services.rate_limit import RateLimiter
from services.settings import Settings


@dataclass
class AppState:
    settings: Settings
    clients: ServiceClients  # sync Redis, job store, storage: used from the threadpool
    redis_async: aredis.Redis  # event streams (SSE, Prefer: wait) block here without holding a thread
    queue: Queue
    webhook_queue: Queue
    keys: KeyRing | None  # None: authentication explicitly disabled (local development)
    rate_limiter: RateLimiter | None  # None: no per-key submission limit
