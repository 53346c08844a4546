"""Worker presence per model (``services/fleet.py``) on a real Redis: what ``GET /v1/models`` counts."""

from __future__ import annotations

import asyncio
import time

import redis as redis_lib
import redis.asyncio as aredis

from services.fleet import Presence, announce, first_seen, presence_key, ready_counts, withdraw


def counts(redis_url: str, models: list[str], now: float | None = None) -> dict[str, int]:
    async def read() -> dict[str, int]:
        client = aredis.Redis.from_url(redis_url)
        try:
            return await ready_counts(client, models, now=now)
        finally:
            await client.aclose()

    return asyncio.run(read())


def test_an_announcement_counts_until_its_ttl_runs_out(redis_url: str, redis_client: redis_lib.Redis) -> None:
    announce(redis_client, "sd-m", "w1", ttl_s=20, now=1000.0)
    announce(redis_client, "sd-m", "w2", ttl_s=20, now=1010.0)
    announce(redis_client, "sd-l", "w3", ttl_s=20, now=1010.0)
    assert counts(redis_url, ["sd-m", "sd-l", "none"], now=1015.0) == {"sd-m": 2, "sd-l": 1, "none": 0}
    # w1 (killed, say) stops announcing: 20 s after its last announcement it is no longer counted.
    assert counts(redis_url, ["sd-m"], now=1020.0) == {"sd-m": 1}
    assert counts(redis_url, ["sd-m"], now=1031.0) == {"sd-m": 0}
    # A later announcement also sweeps the entries that ran out, so the set never grows with dead workers.
    announce(redis_client, "sd-m", "w4", ttl_s=20, now=1040.0)
    assert redis_client.zrange(presence_key("sd-m"), 0, -1) == [b"w4"]


def test_withdrawing_uncounts_at_once_and_first_seen_is_kept(
    redis_url: str, redis_client: redis_lib.Redis
) -> None:
    announce(redis_client, "sd-m", "w1", ttl_s=20, now=1000.0)
    announce(redis_client, "sd-m", "w1", ttl_s=20, now=1005.0)
    withdraw(redis_client, "sd-m", "w1")
    assert counts(redis_url, ["sd-m"], now=1006.0) == {"sd-m": 0}

    async def seen() -> dict[str, int | None]:
        client = aredis.Redis.from_url(redis_url)
        try:
            return await first_seen(client, ["sd-m", "never"])
        finally:
            await client.aclose()

    assert asyncio.run(seen()) == {"sd-m": 1000, "never": None}


def test_presence_keeps_announcing_from_its_thread_and_withdraws_on_stop(
    redis_url: str, redis_client: redis_lib.Redis
) -> None:
    presence = Presence(redis_client, "sd-m", "w1", interval_s=0.05, ttl_s=0.2)
    presence.start()
    try:
        time.sleep(0.5)  # longer than the ttl: only the repeated announcements keep it counted
        assert counts(redis_url, ["sd-m"]) == {"sd-m": 1}
    finally:
        presence.stop()
    assert counts(redis_url, ["sd-m"]) == {"sd-m": 0}
