"""What the API process holds for its lifetime, created in the lifespan and handed out by dependencies."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import redis.asyncio as aredis
from rq import Queue

from api.waits import Waits
from services.admission import Admitter, BatchAdmitter
from services.api_keys import KeyRing
from services.clients import ServiceClients
from services.content_safety import PromptFilter
from services.rate_limit import TokenGate
from services.settings import Settings


@dataclass(frozen=True)
class ModelLine:
    """One served model's way in: its two queues and the admission scripts that push onto them."""

    model: str
    queue: Queue  # interactive jobs
    batch_queue: Queue  # batch items: served only when the generation queue is empty
    admitter: Admitter  # submissions: idempotency, queue ceiling, the key's share and enqueue in one script
    batch_admitter: BatchAdmitter  # a batch and all of its items (and its batch tokens), or nothing


@dataclass
class AppState:
    settings: Settings
    clients: ServiceClients  # sync Redis, job store, storage: used from the threadpool
    redis_async: aredis.Redis  # submissions and reads: no thread held while Redis answers; never to wait
    lines: dict[str, ModelLine]  # every accepted model (DARKROOM_MODEL_NAME/MODEL, DARKROOM_MODELS)
    webhook_queue: Queue
    keys: KeyRing | None  # None: authentication explicitly disabled (local development)
    waits: Waits  # SSE streams, Prefer: wait, OpenAI calls: per-key leases, their own pool, shutdown signal
    prompt_filter: PromptFilter = field(default_factory=PromptFilter)  # the blocklist (empty: off)
    submit_gate: TokenGate | None = None  # a key's submission bucket (None: no rate limit)
    read_gate: TokenGate | None = None  # a key's read bucket (None: reads not limited)
    # Threads decoding submitted images at once (DARKROOM_IMAGE_DECODE_THREADS): the CPU they take is
    # bounded, whatever the number of requests carrying images.
    image_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(2))

    def line(self, model: str | None) -> ModelLine:
        """The line of ``model`` (None: the default model's); KeyError for one not served here."""
        return self.lines[model or self.settings.served_model]
