"""Clients built from a ``redis+sentinel://`` URL follow a failover by themselves.

A real primary, replica and three Sentinels (``redis_ha``): the primary is SIGKILLed; meanwhile every
client's error is one ``REDIS_UNAVAILABLE`` covers, and afterwards the same client objects — our sync and
asyncio clients, and the connection RQ's scheduler rebuilds from ours — reach the promoted replica.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis
from rq.scheduler import RQScheduler

from devtools.redis_ha import RedisHA
from devtools.redis_server import RedisServer
from services.clients import REDIS_UNAVAILABLE, make_async_redis, make_redis, retry_while_redis_down


def test_sync_async_and_rq_scheduler_clients_reconnect_to_the_promoted_replica(redis_ha: RedisHA) -> None:
    sync_client = make_redis(redis_ha.url)
    scheduler_connection = RQScheduler(["q"], connection=make_redis(redis_ha.url)).connection
    sync_client.set("before", "1")
    assert scheduler_connection.get("before") == b"1"
    old = redis_ha.primary()
    assert sync_client.wait(1, 2000) == 1

    async def main() -> None:
        async_client = make_async_redis(redis_ha.url, socket_timeout=5.0)
        try:
            assert await async_client.get("before") == b"1"
            old.kill()
            errors = await _until_writable(async_client)
            assert all(isinstance(error, REDIS_UNAVAILABLE) for error in errors), errors
            assert await async_client.get("before") == b"1"  # acknowledged by WAIT: survived
        finally:
            await async_client.aclose()

    asyncio.run(main())
    new = redis_ha.wait_for_failover(old)
    assert new.port != old.port
    assert retry_while_redis_down(lambda: sync_client.set("after", "sync"), what="sync", deadline_s=30)
    rq_read = retry_while_redis_down(lambda: scheduler_connection.get("after"), what="rq", deadline_s=30)
    assert rq_read == b"sync"
    with redis.Redis.from_url(new.url) as direct:
        assert direct.get("after") == b"sync"


async def _until_writable(client: aredis.Redis, timeout: float = 30.0) -> list[BaseException]:
    """Write until a write succeeds; the errors met on the way (none may escape REDIS_UNAVAILABLE)."""
    errors: list[BaseException] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.set("during", "1")
            return errors
        except Exception as exc:
            errors.append(exc)
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def test_a_replica_refusing_a_write_counts_as_unavailable(
    redis_pair: tuple[RedisServer, RedisServer],
) -> None:
    """A ``redis://`` name still leading to a demoted primary: ``READONLY`` is "retry", not a bug."""
    _, replica = redis_pair
    client = make_redis(replica.url)
    with pytest.raises(redis.exceptions.ReadOnlyError) as caught:
        client.set("k", "v")
    assert isinstance(caught.value, REDIS_UNAVAILABLE)
    client.execute_command("REPLICAOF", "NO", "ONE")  # what a failover does to it
    assert client.set("k", "v")


def test_a_replica_refusing_a_write_in_an_async_pipeline_drops_its_connection_too(
    redis_pair: tuple[RedisServer, RedisServer],
) -> None:
    """As for a command: a ``READONLY`` reply inside a pipeline (a GET's read token, a wait's lease ride in
    the read's) drops its connection — after the pipeline's other replies are read — so the next command
    reconnects to wherever the address now leads."""
    _, replica = redis_pair

    async def main() -> tuple[list[object], int, int]:
        client = make_async_redis(replica.url, socket_timeout=5.0)
        try:
            before = await client.client_id()
            async with client.pipeline(transaction=False) as pipe:
                pipe.set("k", "v")
                pipe.get("k")
                replies = await pipe.execute(raise_on_error=False)
            return replies, before, await client.client_id()
        finally:
            await client.aclose()

    (refused, read), before, after = asyncio.run(main())
    assert isinstance(refused, redis.exceptions.ReadOnlyError) and isinstance(refused, REDIS_UNAVAILABLE)
    assert read is None  # the reply after it was read all the same
    assert after != before  # a new connection


def test_redis_and_sentinel_passwords_are_each_sent_where_they_belong(tmp_path: Path) -> None:
    """``user:pass@`` authenticates to the Redis nodes, ``?sentinel_password=`` to the Sentinels."""
    with RedisHA(tmp_path / "ha", password="node-secret", sentinel_password="sentinel-secret") as ha:
        assert ":node-secret@" in ha.url and ha.url.endswith("?sentinel_password=sentinel-secret")
        client = make_redis(ha.url)
        assert client.set("k", "v") and client.get("k") == b"v"
        without_sentinel_password = make_redis(ha.url.split("?", 1)[0])
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError):  # no Sentinel answers: MasterNotFoundError
            without_sentinel_password.get("k")
        assert time.monotonic() - started < 2.0, "each Sentinel is asked once, not retried with backoff"
        ha.sentinels[0].stop()  # the first one listed is down: the next one answers at once
        started = time.monotonic()
        assert make_redis(ha.url).get("k") == b"v"
        assert time.monotonic() - started < 2.0
        without_node_password = make_redis(ha.url.replace(":node-secret@", ""))
        with pytest.raises(redis.exceptions.AuthenticationError):
            without_node_password.get("k")
