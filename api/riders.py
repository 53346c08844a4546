"""Commands that ride in a job read's round trip: sent in the same pipeline as its ``HGETALL``\\s, each with
its own handling of its reply (``api.generations.service``'s reads take them).

A ``GET`` of a job takes the key's read token this way (``api.limits.read_token_riders``), and the end of a
``Prefer: wait`` gives its lease back (``api.waits.Waits.release_riders``): one round trip where each took
two. Besides the commands themselves, Redis spends ~20-30 µs of CPU on every round trip.
"""

from __future__ import annotations

from typing import Any, Protocol

from redis.asyncio.client import Pipeline


class Rider(Protocol):
    def send(self, pipe: Pipeline) -> None:
        """Queue exactly one command on ``pipe`` (a pipeline without a transaction)."""

    async def settle(self, reply: Any) -> None:
        """Take the command's reply — or the error Redis answered instead, which is passed here, not raised.
        Raising refuses the request; the read that rode with it is then discarded."""
