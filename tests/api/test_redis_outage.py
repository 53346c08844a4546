"""Fault 3: Redis restarted (AOF on) while jobs are queued and running.

No job is lost: the running one finishes in the same run, the queued ones run after it. While Redis is
down the API answers 503 ``redis_unavailable`` problem+json with ``Retry-After`` at once (never hangs,
never 500), an open event stream ends instead of hanging, and API and worker reconnect by themselves.

The restart is a clean one (SIGTERM: Redis flushes its AOF and exits), as an orchestrator or an operator
restarts it; see docs/operate/reliability.md for what a crash (SIGKILL) could lose. The figures are printed
(``pytest -s``) and recorded there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas.problems import PROBLEM_CONTENT_TYPE
from services.jobs import job_key
from tests.fixtures.http_receiver import HttpReceiver
from tests.fixtures.stack import ONE_THREAD, Stack, start_stack
from tests.fixtures.tcp_proxy import TcpProxy

SMALL: dict[str, Any] = {"prompt": "a red fox", "width": 512, "height": 512, "num_inference_steps": 2}
LONG: dict[str, Any] = {**SMALL, "num_inference_steps": 12}  # still running when Redis goes away
OUTAGE_S = 3.0
PROMPT_S = 3.0  # the most any request may take to answer while Redis is down


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack-redis-outage")
    # A webhook keeps retrying across the whole outage, however slow a loaded machine makes the jobs.
    env = {"DARKROOM_WEBHOOK_MAX_ATTEMPTS": "50", "DARKROOM_WEBHOOK_BACKOFF_MAX": "2"}
    yield from start_stack(
        tmp, f"file://{tmp / 'outputs'}", tiny_model_dir, extra_env=env, process_env=ONE_THREAD
    )


class EventStreamWatcher(threading.Thread):
    """Follows a job's SSE stream in the background and notes when the server ends it."""

    def __init__(self, url: str) -> None:
        super().__init__(name="sse-watcher", daemon=True)
        self.url = url
        self.first_event = threading.Event()
        self.ended = threading.Event()
        self.ended_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, timeout=httpx.Timeout(5.0, read=30.0)) as response:
                for line in response.iter_lines():
                    if line.startswith("id:"):
                        self.first_event.set()
        except httpx.HTTPError as exc:  # a read timeout would mean the stream hung
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.ended.set()


def wait_until(predicate: Any, timeout: float, what: str) -> float:
    """Poll ``predicate`` every 50 ms; seconds it took. Fails after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - started


def answers_ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def assert_redis_unavailable(response: httpx.Response, elapsed: float) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert response.json()["code"] == "redis_unavailable"
    assert int(response.headers["retry-after"]) >= 1
    assert elapsed < PROMPT_S, f"answered after {elapsed:.2f}s"


def test_a_redis_restart_loses_no_job_and_the_api_says_503_meanwhile(
    stack: Stack, webhook_receiver: HttpReceiver
) -> None:
    server = stack.redis_server
    assert server is not None
    figures: dict[str, float] = {}
    receiver = TcpProxy("127.0.0.1", webhook_receiver.port)
    with receiver, stack.client() as client:
        # A webhook whose retries are scheduled before the restart and only succeed after it: RQ's
        # scheduler process (which fires delayed retries) must survive the restart as well.
        receiver.down()
        notified = client.post(
            "/v1/generations", json={**SMALL, "seed": 0, "webhook_url": receiver.url + "/hook"}
        ).json()["id"]
        running = client.post("/v1/generations", json={**LONG, "seed": 1}).json()["id"]
        queued = [client.post("/v1/generations", json={**SMALL, "seed": s}).json()["id"] for s in (2, 3)]
        wait_until(lambda: client.get(f"/v1/generations/{running}").json()["progress"], 60, "job started")
        watcher = EventStreamWatcher(f"{stack.api_url}/v1/generations/{running}/events")
        watcher.start()
        assert watcher.first_event.wait(10)
        worker_name = stack.redis().hget(job_key(running), "worker")

        server.stop()  # SIGTERM: Redis writes out its AOF and exits
        down_at, down_wall = time.monotonic(), time.time()
        requests = [
            ("POST", "/v1/generations", {"json": {**SMALL, "seed": 4}}),
            ("POST", "/v1/generations", {"json": SMALL, "headers": {"Prefer": "wait=10"}}),
            ("GET", f"/v1/generations/{queued[0]}", {}),
            ("POST", f"/v1/generations/{queued[1]}/cancel", {}),
            ("GET", f"/v1/generations/{running}/events", {}),
            ("GET", "/readyz", {}),
        ]
        slowest = 0.0
        for method, path, options in requests:
            started = time.monotonic()
            response = client.request(method, path, **options)
            elapsed = time.monotonic() - started
            assert_redis_unavailable(response, elapsed)
            slowest = max(slowest, elapsed)
        figures["slowest 503 while down (s)"] = slowest
        assert client.get("/healthz").status_code == 200  # alive: no restart wanted, just no traffic

        assert watcher.ended.wait(PROMPT_S), "the open event stream hung on the dead Redis"
        assert watcher.error is None, watcher.error
        assert watcher.ended_at is not None
        figures["open SSE stream ended after (s)"] = max(0.0, watcher.ended_at - down_at)

        time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))  # the outage itself
        assert stack.processes["worker"].poll() is None, stack.logs("worker")
        server.restart()  # same port, same data dir: the AOF is replayed
        server_up_at = time.monotonic()
        figures["Redis down for (s)"] = time.monotonic() - down_at
        figures["API ready again after (s)"] = wait_until(
            lambda: answers_ok(client, "/readyz"), 10, "API ready after the restart"
        )
        step_before = client.get(f"/v1/generations/{running}").json()["progress"]["step"]

        def moved_on() -> bool:
            job = client.get(f"/v1/generations/{running}").json()
            return job["status"] != "running" or job["progress"]["step"] > step_before

        figures["worker writing progress again after (s)"] = wait_until(moved_on, 30, "worker reconnected")

        receiver.up()
        receiver_up_at = time.monotonic()
        webhook_receiver.wait_for(1, timeout=15)
        figures["retried webhook arrived after the receiver was back (s)"] = time.monotonic() - receiver_up_at
        figures["... and after Redis came back (s)"] = time.monotonic() - server_up_at

        def delivery() -> dict[str, Any]:
            [only] = client.get(f"/v1/generations/{notified}").json()["webhook"]["deliveries"]
            return dict(only)

        wait_until(lambda: delivery()["state"] != "pending", 10, "delivery recorded")
        assert delivery()["state"] == "delivered" and len(delivery()["attempts"]) > 1, delivery()

        done = {"succeeded", "failed", "canceled"}
        finished = {job_id: stack.wait_for(job_id, done, timeout=120) for job_id in [running, *queued]}
        figures["all three jobs done after the restart (s)"] = time.monotonic() - down_at - OUTAGE_S
        assert {job_id: job["status"] for job_id, job in finished.items()} == dict.fromkeys(
            [running, *queued], "succeeded"
        ), finished
        completed_at = datetime.fromisoformat(finished[running]["completed_at"].replace("Z", "+00:00"))
        assert completed_at.timestamp() > down_wall + OUTAGE_S  # it really ran across the outage
        connection = stack.redis()
        assert connection.hget(job_key(running), "attempt") in (None, b"1")  # finished, not re-run
        assert {connection.hget(job_key(job_id), "worker") for job_id in finished} == {worker_name}
        assert stack.processes["worker"].poll() is None  # the same worker process throughout

        after = client.post("/v1/generations", json={**SMALL, "seed": 5}).json()["id"]
        assert stack.wait_for(after, {"succeeded", "failed"})["status"] == "succeeded"
    print("\nRedis restart:", {name: round(value, 2) for name, value in figures.items()})
