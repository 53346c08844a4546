"""DARKROOM_REDIS_MIN_REPLICA_ACKS through the API process: a submission no replica acknowledged in time is
503 ``redis_unavailable`` with Retry-After, and its Idempotency-Key replay returns the one job it made."""

from __future__ import annotations

from pathlib import Path

from devtools.redis_server import RedisServer
from devtools.stack import Stack
from schemas.problems import PROBLEM_CONTENT_TYPE
from services.clients import make_redis
from tests.fixtures.redis import wait_in_sync


def test_the_api_answers_503_while_no_replica_acknowledges_and_the_replay_is_the_same_job(
    tmp_path: Path, redis_pair: tuple[RedisServer, RedisServer]
) -> None:
    primary, replica = redis_pair
    env = {"DARKROOM_REDIS_MIN_REPLICA_ACKS": "1", "DARKROOM_REDIS_REPLICA_ACK_TIMEOUT": "0.3"}
    body = {"prompt": "a red fox", "width": 512, "height": 512, "num_inference_steps": 2}
    with Stack(tmp_path, env=env, redis_url=primary.url, worker=False, webhooks=False) as stack:
        with stack.client() as client:
            assert client.post("/v1/generations", json=body).status_code == 202
            replica.stop()
            refused = client.post("/v1/generations", json=body, headers={"Idempotency-Key": "k-1"})
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == PROBLEM_CONTENT_TYPE
            assert refused.json()["code"] == "redis_unavailable"
            assert int(refused.headers["retry-after"]) >= 1
            replica.start()
            wait_in_sync(primary)
            replayed = client.post("/v1/generations", json=body, headers={"Idempotency-Key": "k-1"})
            assert replayed.status_code == 202, replayed.text
            job = client.get(f"/v1/generations/{replayed.json()['id']}").json()
            assert job["status"] == "queued"
            with make_redis(primary.url) as on_primary:
                queued = sum(on_primary.llen(key) for key in on_primary.scan_iter(b"rq:queue:*"))
            assert queued == 2  # the refused submission was admitted once, not again by its replay
