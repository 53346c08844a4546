"""Issue 16, cases 2 and 11: waits (SSE streams, ``Prefer: wait``, OpenAI calls) have a per-key share, their
own Redis pool and a per-process cap; a client that leaves, or a server that stops, ends its wait at once.

Real processes: Redis and the API under uvicorn, two API keys, no GPU worker (jobs stay queued, so every
wait lasts until something ends it). Waits are held on raw sockets, so "the client left" is a real close.
The last tests drive a wait in-process against a real Redis, where its races can be made deterministic.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from api.generations.events import READ_TIMEOUT_S, wait_until_finished
from api.waits import Waits, lease_key
from bench.isolation_waits import BODY, close_all, open_waits, probe_other_key, statuses, wait_released
from devtools.stack import TINY_QUEUE, Stack
from services.clients import make_async_redis

KEYS = {"a": "dr_" + secrets.token_urlsafe(24), "b": "dr_" + secrets.token_urlsafe(24)}
SHARE = 4
RELEASED_WITHIN_S = 2.0
SANITY_P99_MS = 2_000.0  # a bound against hangs only; speed targets live in bench/isolation_waits.py


@contextmanager
def _stack(tmp: Path, env: dict[str, str], **kwargs: object) -> Iterator[Stack]:
    env = {"DARKROOM_RATE_LIMIT_PER_MINUTE": "0", **env}  # B's POST loop must not hit its own budget
    with Stack(tmp, env=env, worker=False, webhooks=False, **kwargs) as stack:  # type: ignore[arg-type]
        yield stack


def _job(stack: Stack, key: str) -> str:
    answer = httpx.post(f"{stack.api_url}/v1/generations", json=BODY, headers=stack.auth(key), timeout=10)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def _check_other_key(stack: Stack, job_id: str, phase: str) -> None:
    figures = probe_other_key(stack.api_url, KEYS["b"], job_id, duration_s=1.5)
    print(
        f"key B, {phase}: "
        + "; ".join(
            f"{k} p50 {figures[k]['p50']:.1f} ms p99 {figures[k]['p99']:.1f} ms" for k in ("get", "post")
        )
        + f"; readyz p99 {figures['readyz']['p99']:.1f} ms; statuses {figures['statuses']}"
    )
    assert figures["5xx"] == 0, figures["statuses"]
    assert all(figures[kind]["p99"] < SANITY_P99_MS for kind in ("get", "post", "readyz")), figures


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"DARKROOM_MAX_WAITS_PER_KEY": str(SHARE)}
    with _stack(tmp_path_factory.mktemp("waits"), env, api_keys=KEYS) as stack:
        yield stack


def test_a_key_gets_429_beyond_its_share_of_waits_and_other_keys_see_no_5xx(shared_stack: Stack) -> None:
    stack = shared_stack
    a_job, b_job = _job(stack, "a"), _job(stack, "b")
    streams = open_waits(stack.api_url, KEYS["a"], f"/v1/generations/{a_job}/events", 40)
    try:
        seen = Counter(statuses(streams, wait_s=5.0))
        assert seen == {200: SHARE, 429: 40 - SHARE}, seen
        with httpx.Client(base_url=stack.api_url, headers=stack.auth("a"), timeout=10) as a:
            refused = a.get(f"/v1/generations/{a_job}/events")
            waited = a.post("/v1/generations", json=BODY, headers={"Prefer": "wait=30"})
            openai = a.post("/v1/images/generations", json={"prompt": "a fox", "size": "1024x1024"})
            polled = a.get(f"/v1/generations/{a_job}")
        for answer in (refused, waited, openai):
            assert answer.status_code == 429, answer.text
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert answer.json()["code"] == "too_many_waits"
            assert int(answer.headers["retry-after"]) >= 1
        assert openai.json()["error"]["code"] == "too_many_waits"  # the openai SDKs read this member
        assert polled.status_code == 200  # reading is not waiting
        _check_other_key(stack, b_job, f"while key A holds {SHARE} streams and is refused more")
    finally:
        close_all(streams)
    with stack.redis() as store:
        released = wait_released(store, "a", timeout_s=RELEASED_WITHIN_S)
    assert released is not None, "key A's streams were not released after its clients left"
    print(f"key A's {SHARE} streams released {released:.2f} s after their sockets closed")
    with httpx.Client(base_url=stack.api_url, headers=stack.auth("a"), timeout=10) as a:
        with a.stream("GET", f"/v1/generations/{a_job}/events") as again:
            assert again.status_code == 200
    with stack.redis() as store:
        assert wait_released(store, "a", timeout_s=RELEASED_WITHIN_S) is not None


def test_a_client_that_leaves_a_prefer_wait_gives_its_share_back_at_once(shared_stack: Stack) -> None:
    stack = shared_stack
    waits = open_waits(
        stack.api_url, KEYS["a"], "/v1/generations", SHARE, method="POST", body=BODY, prefer="wait=60"
    )
    try:
        with stack.redis() as store:
            deadline = time.monotonic() + 10
            while store.zcard(lease_key("a")) < SHARE and time.monotonic() < deadline:
                time.sleep(0.02)
            assert store.zcard(lease_key("a")) == SHARE
        assert statuses(waits, wait_s=0.2) == [None] * SHARE  # all still waiting
        with httpx.Client(base_url=stack.api_url, headers=stack.auth("a"), timeout=10) as a:
            refused = a.post("/v1/generations", json=BODY, headers={"Prefer": "wait=30"})
        assert refused.status_code == 429 and refused.json()["code"] == "too_many_waits"
    finally:
        close_all(waits)
    with stack.redis() as store:
        released = wait_released(store, "a", timeout_s=RELEASED_WITHIN_S)
    assert released is not None, "key A's Prefer: wait was not released after its clients left"
    print(f"key A's {SHARE} Prefer waits released {released:.2f} s after their sockets closed")


def test_waits_never_take_the_pool_that_serves_other_requests(tmp_path: Path) -> None:
    """No per-key share at all, 120 streams (more than the shared pool's 100 connections): other requests
    are unaffected, and beyond the process cap a wait gets 503 ``server_busy``, never anyone else."""
    env = {"DARKROOM_MAX_WAITS_PER_KEY": "0", "DARKROOM_MAX_WAITS": "125"}
    with _stack(tmp_path, env, api_keys=KEYS) as stack:
        a_job, b_job = _job(stack, "a"), _job(stack, "b")
        path = f"/v1/generations/{a_job}/events"
        streams = open_waits(stack.api_url, KEYS["a"], path, 120)
        try:
            assert Counter(statuses(streams, wait_s=10.0)) == {200: 120}
            _check_other_key(stack, b_job, "while key A holds 120 streams")
            more = open_waits(stack.api_url, KEYS["b"], path.replace(a_job, b_job), 10)
            streams += more
            assert Counter(statuses(more, wait_s=5.0)) == {200: 5, 503: 5}
            with httpx.Client(base_url=stack.api_url, headers=stack.auth("b"), timeout=10) as b:
                busy = b.get(f"/v1/generations/{b_job}/events")
                assert b.get(f"/v1/generations/{b_job}").status_code == 200
                assert b.get("/readyz").status_code == 200
            assert busy.status_code == 503 and busy.json()["code"] == "server_busy", busy.text
            assert int(busy.headers["retry-after"]) >= 1
        finally:
            close_all(streams)


def _read_response(sock: socket.socket, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(timeout_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def test_sigterm_during_a_prefer_wait_answers_202_with_the_admitted_job(tmp_path: Path) -> None:
    """uvicorn waits for in-flight requests before the app hears of the shutdown; the wait must end at the
    signal, not be cut after the graceful timeout (a bare text/plain 500 that names no job). On failure the
    API's whole log is printed: the line that tells why is rarely among the last ones."""
    graceful_s = 10  # generous: a loaded machine must not turn a slow answer into uvicorn's cut
    process_env = {"api": {"UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN": str(graceful_s)}}
    with _stack(tmp_path, {}, process_env=process_env) as stack, _log_on_failure(stack, "api"):
        (sock,) = open_waits(
            stack.api_url, None, "/v1/generations", 1, method="POST", body=BODY, prefer="wait=60"
        )
        with sock, stack.redis() as store:
            _await_queued(store)  # admitted: the wait starts now (or at once ends, if the signal is first)
            stopped_at = time.monotonic()
            stack.processes["api"].send_signal(signal.SIGTERM)
            status, headers, body = _read_response(sock, timeout_s=graceful_s + 5)
            answered_s = time.monotonic() - stopped_at
            print(f"SIGTERM during Prefer: wait answered {status} after {answered_s:.2f} s")
            assert status == 202, (status, headers, body)
            assert headers["content-type"] == "application/json"
            job = json.loads(body)
            assert headers["location"] == f"/v1/generations/{job['id']}"
            assert job["status"] == "queued"
            assert answered_s < graceful_s
            assert store.exists(f"darkroom:job:{job['id']}")
        # uvicorn re-raises the signal it handled once it has shut down: a clean exit by SIGTERM.
        assert stack.processes["api"].wait(timeout=10) in (0, -signal.SIGTERM)


@contextmanager
def _log_on_failure(stack: Stack, name: str) -> Iterator[None]:
    """Print process ``name``'s whole log if the block fails (pytest shows it with the failure)."""
    try:
        yield
    except BaseException:
        print(f"--- {name} log ---\n{stack.logs(name, tail=None)}--- end of {name} log ---")
        raise


def _await_queued(store: redis.Redis, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not store.llen(TINY_QUEUE):
        assert time.monotonic() < deadline, "the job was never queued"
        time.sleep(0.02)


# --- in-process: the wait's own race, on a real Redis -----------------------------------------------------


def test_a_wait_cut_by_the_shutdown_while_its_first_read_is_sent_ends_at_once(redis_url: str) -> None:
    """The race behind the SIGTERM test's rare 500, made deterministic: the shutdown is signalled 0, 1, 2, …
    turns of the event loop into a wait's first read, while its fresh connection says hello, pings and
    sends the XREAD. On Python 3.11 a cancellation landing as redis-py's send completes was swallowed
    (``asyncio.wait_for``), and the read blocked on for its whole slice, the request with it: most of turns
    2 to ~20 did, on every run. Each wait must now end at once, as stopped (a second cancellation comes
    0.1 s after the first)."""

    async def cut_after(turns: int) -> tuple[object, float]:
        blocking = make_async_redis(
            redis_url, socket_timeout=READ_TIMEOUT_S, max_connections=1, blocking=True
        )
        waits = Waits(redis=blocking, blocking=blocking, per_key=0, per_process=1)

        async def signal_shutdown() -> None:
            for _ in range(turns):
                await asyncio.sleep(0)
            waits.shutdown.set()

        loop = asyncio.get_running_loop()
        started = loop.time()
        signalling = asyncio.ensure_future(signal_shutdown())
        try:
            async with asyncio.timeout(4):
                answer: object = await waits.until(wait_until_finished(blocking, "gen_" + "0" * 32, 30))
        except TimeoutError:
            answer = "still waiting after 4 s"
        finally:
            await signalling
            await blocking.aclose()
        return answer, loop.time() - started

    async def sweep() -> list[tuple[object, float]]:
        return [await cut_after(turns) for turns in range(25)]

    outcomes = asyncio.run(sweep())
    late = [(turns, answer, round(took, 3)) for turns, (answer, took) in enumerate(outcomes) if took > 2.0]
    assert not late, late
    assert all(answer == (False, None) for answer, _ in outcomes), outcomes


def test_a_wait_whose_read_fails_once_the_shutdown_is_signalled_counts_as_stopped(redis_url: str) -> None:
    """A read that fails as the server stops (its connection closed under it) ends the wait as the shutdown
    does, ``(False, None)``: the route then answers with what it has (a ``Prefer: wait`` its 202), not with
    the read's error. The same failure with no shutdown in sight is still the request's error."""

    async def main() -> tuple[bool, bool | None]:
        client = make_async_redis(redis_url, socket_timeout=READ_TIMEOUT_S)
        waits = Waits(redis=client, blocking=client, per_key=0, per_process=1)

        async def read_that_fails() -> bool:
            raise redis.exceptions.ConnectionError("Connection closed by server.")

        async def read_that_fails_at_the_shutdown() -> bool:
            await waits.shutdown.wait()  # wakes in the same turn as the shutdown's own waiter, and first
            return await read_that_fails()

        try:
            with pytest.raises(redis.exceptions.ConnectionError):
                await waits.until(read_that_fails())
            asyncio.get_running_loop().call_soon(waits.shutdown.set)
            return await waits.until(read_that_fails_at_the_shutdown())
        finally:
            await client.aclose()

    assert asyncio.run(main()) == (False, None)
