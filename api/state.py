"""What the API process holds for its lifetime, created in the lifespan and handed out by dependencies."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aredis
from rq import Queue

from services.admission import Admitter, BatchAdmitter
from services.api_keys import KeyRing
from services.clients import ServiceClients
from services.content_safety import PromptFilter
from services.settings import Settings


@dataclass
class AppState:
    settings: Settings
    clients: ServiceClients  # sync Redis, job store, storage: used from the threadpool
    redis_async: aredis.Redis  # submissions, reads and event streams: no thread held while Redis answers
    queue: Queue
    webhook_queue: Queue
    keys: KeyRing | None  # None: authentication explicitly disabled (local development)
    admitter: Admitter  # submissions: idempotency, queue ceiling, rate limit and enqueue in one script
    batch_queue: Queue  # batch items: served only when the generation queue is empty
    batch_admitter: BatchAdmitter  # a batch and all of its items, or nothing, in one script
    prompt_filter: PromptFilter = field(default_factory=PromptFilter)  # the blocklist (empty: off)
