"""The one-connection-per-request async transport (``services.webhooks.one_shot``) through
``make_async_webhook_client`` and ``attempt_delivery_async``, against real loopback servers: pinned TLS
with SNI, the bytes a receiver gets, and every way an exchange can fail mapped to the httpx error a
caller classifies.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import httpx
import pytest

from services.ssrf import build_pinned_request, vet_url
from services.webhooks.delivery import WebhookMessage, attempt_delivery_async, make_async_webhook_client
from services.webhooks.retry import Verdict
from services.webhooks.signing import generate_secret
from tests.fixtures.http_receiver import HttpReceiver, Reply
from tests.fixtures.slow_receiver import SlowReceiver
from tests.services.test_ssrf import fake_dns, tls_receiver

SECRET = generate_secret()
__all__ = ["tls_receiver"]  # the fixture, shared with the synchronous client's TLS tests


async def post(
    url: str, *, verify: ssl.SSLContext | bool = True, dns: dict[str, list[str]] | None = None
) -> int:
    target = vet_url(url, allow_private=True, allow_http=True, resolver=fake_dns(dns))
    async with make_async_webhook_client(5.0, verify=verify) as client:
        response = await client.send(build_pinned_request(client, target, "POST", content=b'{"a":1}'))
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


def test_a_signed_attempt_reaches_the_receiver_and_reports_its_status(webhook_receiver: HttpReceiver) -> None:
    webhook_receiver.script([Reply(503, headers={"Retry-After": "7"})])
    message = WebhookMessage(url=webhook_receiver.url, event_type="x", payload=b'{"k":"v"}', msg_id="msg_1")

    async def attempt() -> tuple[int | None, Verdict]:
        async with make_async_webhook_client(5.0) as client:
            result = await attempt_delivery_async(
                client, message, SECRET, 1, allow_private=True, allow_http=True, deadline_s=5.0
            )
        return result.record.status_code, result.verdict

    assert asyncio.run(attempt()) == (503, Verdict.RETRY)
    [seen] = webhook_receiver.wait_for(1)
    assert seen.body == b'{"k":"v"}' and seen.headers["webhook-id"] == "msg_1"
    assert seen.headers["content-type"] == "application/json"


def attempt_error(url: str, deadline_s: float = 5.0) -> str | None:
    message = WebhookMessage(url=url, event_type="x", payload=b"{}", msg_id="msg_2")

    async def attempt() -> str | None:
        async with make_async_webhook_client(5.0) as client:
            result = await attempt_delivery_async(
                client, message, SECRET, 1, allow_private=True, allow_http=True, deadline_s=deadline_s
            )
        assert result.record.status_code is None and result.verdict is Verdict.RETRY
        return result.record.error

    return asyncio.run(attempt())


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
