"""Webhook delivery against a real loopback receiver: retries, Retry-After, redirects, timeouts, signatures.

Waiting between attempts is injected (``sleep=delays.append``): the tests record the delays the policy
chose instead of spending them.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.ssrf import UnsafeURLError
from services.webhooks.delivery import DeliveryAttempt, DeliveryOutcome, deliver, make_webhook_client, utcnow
from services.webhooks.retry import RetryPolicy, Verdict, classify, next_delay, parse_retry_after
from services.webhooks.signing import generate_secret
from tests.fixtures.http_receiver import HttpReceiver, Reply

SECRET = generate_secret()
PAYLOAD = json.dumps({"type": "job.succeeded", "data": {"id": "job_1"}}).encode()
POLICY = RetryPolicy(max_attempts=5, base_delay_s=1.0, max_delay_s=30.0, max_retry_after_s=120.0)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with make_webhook_client(timeout_s=2.0) as c:
        yield c


def ticking_clock(start: datetime | None = None, step_s: float = 1.0) -> Callable[[], datetime]:
    """A clock that advances ``step_s`` per reading, close to real time so signatures stay verifiable."""
    base = start or datetime.now(UTC)
    counter = itertools.count()
    return lambda: base + timedelta(seconds=step_s * next(counter))


def send(
    client: httpx.Client,
    url: str,
    delays: list[float],
    *,
    policy: RetryPolicy = POLICY,
    allow_private: bool = True,
    clock: Callable[[], datetime] = utcnow,
    msg_id: str | None = None,
) -> tuple[DeliveryOutcome, list[DeliveryAttempt]]:
    """``deliver`` over plain http to loopback, recording chosen delays instead of sleeping them."""
    seen: list[DeliveryAttempt] = []
    outcome = deliver(
        client,
        url,
        "job.succeeded",
        PAYLOAD,
        SECRET,
        policy=policy,
        allow_private=allow_private,
        allow_http=True,
        msg_id=msg_id,
        sleep=delays.append,
        clock=clock,
        rand=lambda: 0.5,
        on_attempt=seen.append,
    )
    return outcome, seen


def test_fails_twice_then_succeeds_on_the_third_attempt(
    client: httpx.Client, webhook_receiver: HttpReceiver
) -> None:
    webhook_receiver.script([500, 503, 200])
    delays: list[float] = []

    outcome, seen = send(client, webhook_receiver.url, delays, clock=ticking_clock())

    assert outcome.delivered and not outcome.gone
    assert [a.status_code for a in outcome.attempts] == [500, 503, 200]
    assert [a.attempt for a in outcome.attempts] == [1, 2, 3]
    assert all(a.error is None and a.duration_ms >= 0 for a in outcome.attempts)
    assert seen == outcome.attempts  # on_attempt saw each attempt as it happened
    assert delays == [0.5, 1.0]  # full jitter with rand=0.5 over 1s, 2s

    requests = webhook_receiver.wait_for(3)
    ids = {r.headers["webhook-id"] for r in requests}
    assert ids == {outcome.msg_id}  # one id across attempts: receivers can deduplicate
    timestamps = [r.headers["webhook-timestamp"] for r in requests]
    assert len(set(timestamps)) == 3  # fresh timestamp (and so signature) per attempt
    for request in requests:
        assert request.body == PAYLOAD
        assert Webhook(SECRET).verify(request.body, request.headers) == json.loads(PAYLOAD)


def test_signature_verifies_on_the_receiver_side_with_the_reference_library(
    client: httpx.Client, webhook_receiver: HttpReceiver
) -> None:
    outcome, _ = send(client, webhook_receiver.url, [])

    (request,) = webhook_receiver.wait_for(1)
    assert outcome.delivered
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("darkroom-webhooks/")
    assert Webhook(SECRET).verify(request.body, request.headers) == json.loads(PAYLOAD)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(request.body + b" ", request.headers)


def test_retry_after_seconds_and_http_date_are_honoured(
    client: httpx.Client, webhook_receiver: HttpReceiver
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    webhook_receiver.script(
        [
            Reply(429, headers={"Retry-After": "7"}),
            Reply(503, headers={"Retry-After": format_datetime(now + timedelta(seconds=30), usegmt=True)}),
            Reply(503, headers={"Retry-After": "86400"}),  # a day: capped by the policy
            200,
        ]
    )
    delays: list[float] = []

    outcome, _ = send(client, webhook_receiver.url, delays, clock=lambda: now)

    assert outcome.delivered
    assert delays == [7.0, 30.0, 120.0]


def test_client_errors_are_not_retried(client: httpx.Client, webhook_receiver: HttpReceiver) -> None:
    webhook_receiver.script([400, 200])
    delays: list[float] = []

    outcome, _ = send(client, webhook_receiver.url, delays)

    assert not outcome.delivered and not outcome.gone
    assert [a.status_code for a in outcome.attempts] == [400]
    assert delays == []
    assert len(webhook_receiver.requests) == 1


def test_410_gone_stops_and_is_reported(client: httpx.Client, webhook_receiver: HttpReceiver) -> None:
    webhook_receiver.script([500, 410, 200])

    outcome, _ = send(client, webhook_receiver.url, [])

    assert outcome.gone and not outcome.delivered
    assert [a.status_code for a in outcome.attempts] == [500, 410]


def test_redirects_are_not_followed_nor_retried(client: httpx.Client, webhook_receiver: HttpReceiver) -> None:
    webhook_receiver.script([Reply(301, headers={"Location": "http://169.254.169.254/latest/meta-data/"})])

    outcome, _ = send(client, webhook_receiver.url, [])

    assert not outcome.delivered
    (attempt,) = outcome.attempts
    assert attempt.status_code == 301
    assert attempt.error == "redirect not followed"
    assert len(webhook_receiver.requests) == 1


def test_timeout_is_retried(webhook_receiver: HttpReceiver) -> None:
    webhook_receiver.script([Reply(200, delay_s=5.0), 200])  # the first reply comes far too late
    delays: list[float] = []

    with make_webhook_client(timeout_s=0.2) as fast_client:
        outcome, _ = send(fast_client, webhook_receiver.url, delays)

    assert outcome.delivered
    first, second = outcome.attempts
    assert first.status_code is None and first.error is not None and "ReadTimeout" in first.error
    assert second.status_code == 200
    assert len(delays) == 1


def test_connection_refused_is_retried_until_attempts_run_out(client: httpx.Client) -> None:
    with HttpReceiver() as receiver:  # grab a free port, then close it: nothing listens there
        url = receiver.url
    delays: list[float] = []

    outcome, _ = send(client, url, delays, policy=RetryPolicy(max_attempts=3, base_delay_s=1.0))

    assert not outcome.delivered and not outcome.gone
    assert [a.status_code for a in outcome.attempts] == [None, None, None]
    assert all(a.error and "ConnectError" in a.error for a in outcome.attempts)
    assert len(delays) == 2


def test_private_target_is_refused_unless_allowed(
    client: httpx.Client, webhook_receiver: HttpReceiver
) -> None:
    delays: list[float] = []

    refused, _ = send(client, webhook_receiver.url, delays, allow_private=False)

    assert not refused.delivered
    (attempt,) = refused.attempts
    assert attempt.status_code is None
    assert attempt.error is not None and "private_address" in attempt.error
    assert delays == []  # an unsafe URL is permanent: no retry
    assert webhook_receiver.requests == []  # and nothing was sent

    allowed, _ = send(client, webhook_receiver.url, delays, allow_private=True)
    assert allowed.delivered


def test_cookies_set_by_one_receiver_are_never_sent_back(
    client: httpx.Client, webhook_receiver: HttpReceiver
) -> None:
    webhook_receiver.script([Reply(500, headers={"Set-Cookie": "session=stolen; Path=/"}), 200])

    send(client, webhook_receiver.url, [])

    first, second = webhook_receiver.wait_for(2)
    assert "cookie" not in second.headers


def test_explicit_msg_id_is_kept(client: httpx.Client, webhook_receiver: HttpReceiver) -> None:
    outcome, _ = send(client, webhook_receiver.url, [], msg_id="msg_job_1_succeeded")

    assert outcome.msg_id == "msg_job_1_succeeded"
    assert webhook_receiver.wait_for(1)[0].headers["webhook-id"] == "msg_job_1_succeeded"


def test_bad_secret_raises_before_anything_is_sent(
    client: httpx.Client, webhook_receiver: HttpReceiver
) -> None:
    with pytest.raises(ValueError, match="whsec_"):
        deliver(client, webhook_receiver.url, "job.succeeded", PAYLOAD, "hunter2", allow_http=True)
    assert webhook_receiver.requests == []


# --- the pure pieces an RQ task reschedules with ----------------------------------------------------------


def _response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers)


@pytest.mark.parametrize(
    ("outcome", "verdict"),
    [
        (_response(200), Verdict.DELIVERED),
        (_response(204), Verdict.DELIVERED),
        (_response(410), Verdict.GONE),
        (_response(408), Verdict.RETRY),
        (_response(429), Verdict.RETRY),
        (_response(500), Verdict.RETRY),
        (_response(599), Verdict.RETRY),
        (_response(301), Verdict.FAILED),
        (_response(400), Verdict.FAILED),
        (_response(404), Verdict.FAILED),
        (httpx.ConnectTimeout("slow"), Verdict.RETRY),
        (httpx.RemoteProtocolError("bad"), Verdict.RETRY),
        (UnsafeURLError("dns_resolution_failed", "x"), Verdict.RETRY),
        (UnsafeURLError("private_address", "x"), Verdict.FAILED),
    ],
)
def test_classify(outcome: httpx.Response | Exception, verdict: Verdict) -> None:
    assert classify(outcome) is verdict


def test_next_delay_backs_off_exponentially_with_a_cap_and_stops_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=8, base_delay_s=1.0, max_delay_s=10.0)
    error = httpx.ReadTimeout("slow")
    ceilings = [next_delay(n, error, policy, rand=lambda: 1.0) for n in range(1, 9)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, None]
    assert next_delay(1, error, policy, rand=lambda: 0.0) == 0.0  # full jitter reaches down to zero
    assert next_delay(1, _response(200), policy) is None
    assert next_delay(1, _response(400), policy) is None
    assert (
        next_delay(10_000, error, RetryPolicy(max_attempts=20_000, max_delay_s=5.0), rand=lambda: 1.0) == 5.0
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: now
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == expected


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_delay_s=-1)
