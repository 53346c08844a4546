"""``bench.job_replay``: a captured job's round trips, sent again under fresh ids, on a real Redis."""

from __future__ import annotations

import asyncio

import redis

from bench.job_replay import Trip, replay, substituted
from bench.redis_cost import unescape

JOB = "gen_0123456789abcdef0123456789abcdef"


def test_monitor_escapes_are_undone_byte_for_byte() -> None:
    assert unescape(rb"{\"step\": 1}") == b'{"step": 1}'
    assert unescape(rb"a\\b\nc\x00\xff") == b"a\\b\nc\x00\xff"


def test_each_replayed_job_gets_its_own_ids_of_the_same_length() -> None:
    trips = [
        Trip("api", "submit", [[b"EVALSHA", b"s", b"1", b"darkroom:waits:k", b"8", b"0bdab3fd1fc0:5"]]),
        Trip("worker", "claim", [[b"HGETALL", f"darkroom:job:{JOB}".encode()]]),
        Trip("worker", "finish", [[b"BLPOP", b"rq:queue:q", b"405"]], blocking=True),
    ]
    first, second = list(substituted(trips, JOB, 1)), list(substituted(trips, JOB, 2))
    assert first[0].commands[0][-1] == b"0bdab3fd1fc0:1"
    assert second[0].commands[0][-1] == b"0bdab3fd1fc0:2"
    key_1, key_2 = first[1].commands[0][1], second[1].commands[0][1]
    assert key_1 != key_2 and len(key_1) == len(f"darkroom:job:{JOB}".encode())
    assert JOB.encode() not in key_1
    assert first[2].commands[0][-1] == b"1"  # a dequeue never waits out the captured timeout


def test_replay_sends_each_trip_as_it_arrived_and_counts_it(redis_url: str) -> None:
    """Pipelines stay one round trip, MULTI blocks stay transactions, and a blocking read is answered by
    the write that the same job makes after it."""
    key = f"darkroom:job:{JOB}".encode()
    trips = [
        Trip("api", "submit", [[b"HSET", key, b"status", b"queued"], [b"RPUSH", b"q", key]]),
        Trip("api", "prefer_wait", [[b"XREAD", b"BLOCK", b"5000", b"STREAMS", key + b":done", b"0-0"]], True),
        Trip("worker", "claim", [[b"MULTI"], [b"HSET", key, b"status", b"running"], [b"EXEC"]]),
        Trip("worker", "finish", [[b"XADD", key + b":done", b"*", b"status", b"succeeded"]]),
        Trip("worker", "finish", [[b"BLPOP", b"q", b"405"]], blocking=True),
    ]
    before, after, wall = asyncio.run(replay(redis_url, trips, JOB, 20, 0, 4, warmup=5))
    assert wall < 5  # no blocking read waited out its timeout
    assert after["commands"] - before["commands"] >= 20 * 7  # MULTI + HSET + EXEC counted as sent
    assert after["round_trips"] - before["round_trips"] < 20 * 7  # pipelines and blocks: fewer reads
    client = redis.Redis.from_url(redis_url)
    hashes = [key for key in client.scan_iter(match=b"darkroom:job:*") if not key.endswith(b":done")]
    statuses = {client.hget(key, "status") for key in hashes}
    assert len(hashes) == 25  # 5 warm-up jobs and 20 measured, each under its own id
    assert statuses == {b"running"}
    assert client.llen("q") == 0  # each job's dequeue took one job
    client.close()


def test_as_captured_each_round_trip_waits_for_its_moment_in_the_job(redis_url: str) -> None:
    trips = [
        Trip("api", "submit", [[b"SET", f"darkroom:job:{JOB}".encode(), b"1"]]),
        Trip("worker", "finish", [[b"DEL", f"darkroom:job:{JOB}".encode()]], at=0.15),
    ]
    _, _, wall = asyncio.run(replay(redis_url, trips, JOB, 2, 0, 2, warmup=0, spaced=True))
    assert wall >= 0.3  # two jobs, one after another, each spread over its captured 0.15 s
