"""Fault: the Redis primary is SIGKILLed during a 200-job burst, and Sentinel promotes its replica.

Real processes throughout: a primary, one replica and three Sentinels on loopback (``devtools.redis_ha``),
the API under uvicorn, a tiny-model GPU worker and the webhook worker, all given the ``redis+sentinel://``
URL and ``DARKROOM_REDIS_MIN_REPLICA_ACKS=1``. Clients retry a 503 with the same Idempotency-Key, as the
docs tell them to. Checked: every submission that got a 202 ends in exactly one terminal state (one
terminal ``status`` event in its stream, matching its record, on the promoted primary); the API answers
nothing but 202 and 503 ``redis_unavailable`` (problem+json, Retry-After) meanwhile; the API, the worker
and the webhook process reconnect by themselves (same processes; a job submitted afterwards succeeds and
its webhook is delivered).

The killed primary is restarted after the failover, as an orchestrator restarts a crashed pod: Sentinel
turns it into the new primary's replica, so ``WAIT`` has a replica to count again. Figures are printed
(``pytest -s``) and recorded in docs/operate/reliability.md.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from devtools.redis_ha import RedisHA
from schemas.problems import PROBLEM_CONTENT_TYPE
from services.jobs.keys import RUNNING_SET
from tests.api.test_load import CHEAPEST, assert_exactly_one_terminal_state_each, drain
from tests.fixtures.http_receiver import HttpReceiver
from tests.fixtures.stack import Stack, stack_env

JOBS = 200
CLIENTS = 16
KILL_AFTER_ACCEPTED = 60  # jobs queued and one running when the primary dies


@pytest.fixture(scope="module")
def ha_stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[RedisHA, Stack]]:
    tmp = tmp_path_factory.mktemp("stack-redis-failover")
    env = {
        **stack_env(tiny_model_dir),
        "DARKROOM_REDIS_MIN_REPLICA_ACKS": "1",
        "DARKROOM_REDIS_REPLICA_ACK_TIMEOUT": "1",
        "DARKROOM_RATE_LIMIT_PER_MINUTE": "0",
        "DARKROOM_MAX_QUEUE_DEPTH": "100000",
        "DARKROOM_PROGRESS_INTERVAL": "1",
        "OMP_NUM_THREADS": "1",
    }
    with (
        RedisHA(tmp / "redis", replicas=1, sentinels=3) as ha,
        Stack(tmp, env=env, redis_url=ha.url) as stack,
    ):
        yield ha, stack


class Submitter:
    """``JOBS`` submissions from ``CLIENTS`` threads, each retried on 503 with its Idempotency-Key."""

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url
        self.lock = threading.Lock()
        self.accepted: dict[int, str] = {}
        self.statuses: Counter[int] = Counter()
        self.unexpected: list[str] = []
        self.first_503_at: float | None = None
        self.last_503_at: float | None = None

    def run(self) -> None:
        local = threading.local()

        def submit(n: int) -> None:
            client = getattr(local, "client", None)
            if client is None:
                client = local.client = httpx.Client(base_url=self.api_url, timeout=30)
            deadline = time.monotonic() + 120
            while True:
                response = client.post(
                    "/v1/generations", json={**CHEAPEST, "seed": n}, headers={"Idempotency-Key": f"burst-{n}"}
                )
                with self.lock:
                    self.statuses[response.status_code] += 1
                if response.status_code == 202:
                    with self.lock:
                        self.accepted[n] = response.json()["id"]
                    return
                if response.status_code != 503 or not self._is_redis_unavailable(response):
                    with self.lock:
                        self.unexpected.append(f"{response.status_code} {response.text[:300]}")
                    return
                now = time.monotonic()
                with self.lock:
                    self.first_503_at = self.first_503_at or now
                    self.last_503_at = now
                assert now < deadline, f"submission {n} refused for 120 s"
                time.sleep(0.25)  # shorter than Retry-After: the test wants to see the switch end

        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            list(pool.map(submit, range(JOBS)))

    @staticmethod
    def _is_redis_unavailable(response: httpx.Response) -> bool:
        return (
            response.headers.get("content-type") == PROBLEM_CONTENT_TYPE
            and response.json().get("code") == "redis_unavailable"
            and int(response.headers.get("retry-after", "0")) >= 1
        )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.slow  # ~2 min on a shared 2-core machine: the stack, the burst and its drain
@pytest.mark.timeout(900)
def test_a_primary_killed_mid_burst_loses_no_acknowledged_job(
    ha_stack: tuple[RedisHA, Stack], webhook_receiver: HttpReceiver
) -> None:
    ha, stack = ha_stack
    figures: dict[str, float] = {}
    submitter = Submitter(stack.api_url)
    burst = threading.Thread(target=submitter.run, name="burst")
    burst.start()
    with stack.client() as client, stack.redis() as watch:

        def ready_to_kill() -> bool:
            with submitter.lock:
                enough = len(submitter.accepted) >= KILL_AFTER_ACCEPTED
            return enough and watch.zcard(RUNNING_SET) > 0

        wait_until(ready_to_kill, 120, "jobs accepted and one running")
        old = ha.primary()
        old.kill()  # SIGKILL: no shutdown, no last AOF write
        killed_at = time.monotonic()
        new = ha.wait_for_failover(old, timeout=60)
        figures["Sentinel promoted the replica after (s)"] = time.monotonic() - killed_at
        old.restart()  # as an orchestrator would; Sentinel makes it the new primary's replica
        ha.wait_for_replicas(1, timeout=60)
        figures["old primary back as a replica after (s)"] = time.monotonic() - killed_at
        burst.join(timeout=300)
        assert not burst.is_alive(), "the burst did not finish"
        assert not submitter.unexpected, submitter.unexpected[:5]
        assert len(submitter.accepted) == JOBS  # every submission got its 202 in the end
        if submitter.first_503_at is not None and submitter.last_503_at is not None:
            figures["503s seen from the kill for (s)"] = submitter.last_503_at - killed_at
        figures["API ready again after the kill (s)"] = time.monotonic() - killed_at
        assert client.get("/readyz").status_code == 200
        job_ids = list(submitter.accepted.values())
        with stack.redis() as connection:
            figures["drain after the burst (s)"] = drain(connection, job_ids, budget_s=400)
            outcomes = assert_exactly_one_terminal_state_each(connection, job_ids)
        assert outcomes == Counter({"succeeded": JOBS}), outcomes
        for name in ("api", "worker", "webhooks"):  # the same processes: reconnected, not restarted
            assert stack.processes[name].poll() is None, stack.logs(name)
        # A job after the switch runs, and its webhook leaves through the webhook process, reconnected.
        hook = {"webhook_url": webhook_receiver.url + "/hook"}
        after = client.post("/v1/generations", json={**CHEAPEST, "seed": 10_000, **hook}).json()["id"]
        assert stack.wait_for(after, {"succeeded", "failed"})["status"] == "succeeded"
        [delivered] = webhook_receiver.wait_for(1, timeout=30)
        assert after in delivered.body.decode()
        assert ha.primary().port == new.port
    statuses = dict(sorted(submitter.statuses.items()))
    print(
        f"\nRedis failover during a {JOBS}-job burst: responses {statuses};",
        {name: round(value, 2) for name, value in figures.items()},
    )
