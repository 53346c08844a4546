"""Per-key rate limits as route dependencies, taken before anything else about the request is looked at.

``submission_token`` runs on every route that submits, *before* FastAPI validates the body (dependencies
are solved first), so the order is: authentication (middleware) → the key's token → validation → the
heavy checks and admission. A key looping invalid or expensive bodies is refused with 429 like any other,
and the image decoding a submission may need (``api.generations.service``) happens only for requests that
got a token. The token is given back when the submission turns out to make nothing (an Idempotency-Key
replay, a full queue, the key's share reached: ``give_back_submission``).

``read_token`` does the same for reads from their own, generous bucket (``DARKROOM_READ_RATE_LIMIT_*``);
``read_token_riders`` takes that token in the round trip of the read itself (``GET`` of a job).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.exceptions
from fastapi import Request
from redis.asyncio.client import Pipeline

from api.auth import ANONYMOUS
from api.deps import app_state
from api.errors import ApiError
from api.riders import Rider
from api.state import AppState
from services.clients import out_of_memory
from services.rate_limit import TokenGate, retry_after_s


def _principal(request: Request) -> str:
    principal = request.scope.get("state", {}).get("principal")
    return principal if isinstance(principal, str) else ANONYMOUS


def rate_limited(wait_ms: int, what: str) -> ApiError:
    wait_s = retry_after_s(wait_ms)
    return ApiError(
        f"too many {what} for this API key; retry in {wait_s} s",
        status=429,
        code="rate_limited",
        headers={"Retry-After": str(wait_s)},
    )


async def _take(gate: TokenGate | None, request: Request, what: str) -> None:
    if gate is None:
        return
    wait_ms = await gate.take(_principal(request))
    if wait_ms:
        raise rate_limited(wait_ms, what)


async def submission_token(request: Request) -> None:
    """One token from the key's submission bucket, or 429 ``rate_limited`` before the body is read."""
    await _take(app_state(request).submit_gate, request, "submissions")


async def read_token(request: Request) -> None:
    """One token from the key's read bucket, or 429 ``rate_limited``.

    A Redis at ``maxmemory`` refuses the bucket's write but still answers reads: then the read goes
    ahead uncounted, since a full job store must not also hide every client's jobs from them."""
    try:
        await _take(app_state(request).read_gate, request, "reads")
    except redis.exceptions.RedisError as exc:
        if not out_of_memory(exc):
            raise


def read_token_riders(state: AppState, principal: str) -> tuple[Rider, ...]:
    """:func:`read_token` as a rider (``api.riders``) of the read it pays for: the token is taken in that
    read's round trip, and a refused one answers 429 ``rate_limited`` as the dependency does, the read
    discarded. None when reads are not limited."""
    return () if state.read_gate is None else (_ReadToken(state.read_gate, principal),)


@dataclass(frozen=True)
class _ReadToken:
    gate: TokenGate
    principal: str

    def send(self, pipe: Pipeline) -> None:
        self.gate.send_take(pipe, self.principal)

    async def settle(self, reply: Any) -> None:
        try:
            if isinstance(reply, redis.exceptions.NoScriptError):  # a restarted Redis: nothing was taken
                wait_ms = await self.gate.take(self.principal)
            elif isinstance(reply, Exception):
                raise reply
            else:
                wait_ms = self.gate.wait_ms(reply)
        except redis.exceptions.RedisError as exc:
            if not out_of_memory(exc):
                raise
            return  # as read_token: a full Redis still serves the read, uncounted
        if wait_ms:
            raise rate_limited(wait_ms, "reads")


async def give_back_submission(state: AppState, principal: str) -> None:
    """A submission that made nothing (replay, full queue, share reached) costs no token after all."""
    if state.submit_gate is not None:
        await state.submit_gate.give_back(principal)
