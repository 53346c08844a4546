"""The one-connection-per-request async transport (``services.webhooks.one_shot``), alone and through
``attempt_delivery_async``, against real loopback servers: pinned TLS
with SNI, the bytes a receiver gets, and every way an exchange can fail mapped to the httpx error a
caller classifies.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Sequence

import httpx
import pytest

from services.ssrf import pinned_request, vet_url
from services.webhooks.delivery import USER_AGENT, AttemptResult, WebhookMessage, attempt_delivery_async
from services.webhooks.one_shot import OneShotTransport
from services.webhooks.retry import Verdict
from services.webhooks.signing import generate_secret
from tests.fixtures.http_receiver import HttpReceiver, Reply
from tests.fixtures.slow_receiver import SlowReceiver
from tests.services.test_ssrf import fake_dns, tls_receiver

SECRET = generate_secret()
__all__ = ["tls_receiver"]  # the fixture, shared with the synchronous client's TLS tests


async def post(url: str, *, verify: ssl.SSLContext, dns: dict[str, Sequence[str]]) -> int:
    target = vet_url(url, allow_private=True, allow_http=True, resolver=fake_dns(dns))
    request = pinned_request(target, "POST", content=b'{"a":1}', headers={}, timeout=httpx.Timeout(5.0))
    response = await OneShotTransport(verify=verify).handle_async_request(request)
    await response.aclose()
    return response.status_code


def test_pinned_tls_verifies_the_certificate_for_the_original_hostname(
    tls_receiver: tuple[HttpReceiver, ssl.SSLContext],
) -> None:
    """The certificate names ``hooks.test``, not 127.0.0.1: SNI and the name check use ``sni_hostname``
    while the socket goes to the pinned IP."""
    receiver, client_ctx = tls_receiver
    url = f"https://hooks.test:{receiver.port}/hook"
    assert asyncio.run(post(url, verify=client_ctx, dns={"hooks.test": ["127.0.0.1"]})) == 200
    [seen] = receiver.wait_for(1)
    assert seen.headers["host"] == f"hooks.test:{receiver.port}" and seen.body == b'{"a":1}'
    assert seen.headers["connection"] == "close"


def test_pinned_tls_still_rejects_a_certificate_for_another_name(
    tls_receiver: tuple[HttpReceiver, ssl.SSLContext],
) -> None:
    receiver, client_ctx = tls_receiver
    url = f"https://other.test:{receiver.port}/hook"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|match"):
        asyncio.run(post(url, verify=client_ctx, dns={"other.test": ["127.0.0.1"]}))
    assert receiver.requests == []


def attempt_at(message: WebhookMessage, deadline_s: float = 5.0) -> AttemptResult:
    """Attempt 1 of ``message`` through a fresh one-shot transport, on an event loop of its own."""
    return asyncio.run(
        attempt_delivery_async(
            OneShotTransport(),
            message,
            SECRET,
            1,
            allow_private=True,
            allow_http=True,
            timeout=httpx.Timeout(5.0),
            deadline_s=deadline_s,
        )
    )


def test_a_signed_attempt_reaches_the_receiver_and_reports_its_status(webhook_receiver: HttpReceiver) -> None:
    webhook_receiver.script([Reply(503, headers={"Retry-After": "7"})])
    message = WebhookMessage(url=webhook_receiver.url, event_type="x", payload=b'{"k":"v"}', msg_id="msg_1")

    result = attempt_at(message)
    assert (result.record.status_code, result.verdict) == (503, Verdict.RETRY)
    [seen] = webhook_receiver.wait_for(1)
    assert seen.body == b'{"k":"v"}' and seen.headers["webhook-id"] == "msg_1"
    assert seen.headers["content-type"] == "application/json" and seen.headers["user-agent"] == USER_AGENT


def attempt_error(url: str, deadline_s: float = 5.0) -> str | None:
    message = WebhookMessage(url=url, event_type="x", payload=b"{}", msg_id="msg_2")
    result = attempt_at(message, deadline_s)
    assert result.record.status_code is None and result.verdict is Verdict.RETRY
    return result.record.error


def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connecting is refused
        error = attempt_error(f"http://127.0.0.1:{port}/hook")
    assert error is not None and error.startswith("ConnectError:")


def test_a_receiver_that_hangs_up_without_answering_is_a_protocol_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:

        def hang_up() -> None:
            conn, _ = server.accept()
            conn.recv(65536)
            conn.close()

        threading.Thread(target=hang_up, daemon=True).start()
        error = attempt_error(f"http://127.0.0.1:{server.getsockname()[1]}/hook")
    assert error is not None and error.startswith("RemoteProtocolError:")


def test_a_trickling_answer_ends_at_the_deadline_as_a_read_timeout() -> None:
    with SlowReceiver("trickle", interval_s=0.1) as trickling:
        error = attempt_error(trickling.url, deadline_s=0.5)
        trickling.wait_for(1)
    assert error == "ReadTimeout: attempt deadline of 0.5s exceeded"
