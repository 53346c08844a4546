"""Standard Webhooks signing, checked against the independent ``standardwebhooks`` reference library."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.webhooks.signing import decode_secret, generate_secret, sign, webhook_headers

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the spec's own example secret
Tamper = Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]]
BODY = b'{"type":"job.succeeded","timestamp":"2024-01-01T00:00:00Z","data":{"id":"job_1"}}'


def test_signature_matches_the_reference_implementation() -> None:
    timestamp = int(time.time())
    headers = webhook_headers(SECRET, "msg_1", timestamp, BODY)

    assert Webhook(SECRET).verify(BODY, headers) == {
        "type": "job.succeeded",
        "timestamp": "2024-01-01T00:00:00Z",
        "data": {"id": "job_1"},
    }
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-timestamp"] == str(timestamp)
    assert headers["content-type"] == "application/json"


def test_known_vector() -> None:
    """Same bytes as the reference library's own signer for the spec's example message."""
    expected = Webhook(SECRET).sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek", datetime.fromtimestamp(1614265330, UTC), "{}"
    )
    assert sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b"{}") == expected
    assert expected.startswith("v1,")


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda h, b: (h, b.replace(b"job_1", b"job_2")), id="body"),
        pytest.param(lambda h, b: ({**h, "webhook-id": "msg_other"}, b), id="msg-id"),
        pytest.param(
            lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b), id="ts"
        ),
    ],
)
def test_tampering_fails_verification(tamper: Tamper) -> None:
    headers, body = tamper(webhook_headers(SECRET, "msg_1", int(time.time()), BODY), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, headers)


def test_wrong_secret_fails_verification() -> None:
    headers = webhook_headers(SECRET, "msg_1", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY, headers)


def test_rotation_sends_one_signature_per_secret_and_either_verifies() -> None:
    new_secret = generate_secret()
    headers = webhook_headers([SECRET, new_secret], "msg_1", int(time.time()), BODY)

    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(SECRET).verify(BODY, headers)
    Webhook(new_secret).verify(BODY, headers)


def test_generated_secret_round_trips() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(decode_secret(secret)) == 32


def test_unpadded_base64_is_accepted_like_the_reference_library() -> None:
    key = b"0123456789abcdefghijklmnop"  # 26 bytes: base64 needs padding
    padded = "whsec_" + base64.b64encode(key).decode()
    assert padded.endswith("=")
    assert decode_secret(padded.rstrip("=")) == key


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with 'whsec_'"),
        ("sk_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with 'whsec_'"),
        ("whsec_not*base64!", "not valid base64"),
        ("whsec_abcde", "not valid base64"),  # 5 characters: no padding can fix that
        ("whsec_", "empty"),
    ],
)
def test_bad_secrets_are_rejected_clearly(secret: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sign(secret, "msg_1", 0, b"{}")


def test_no_secret_at_all_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one"):
        webhook_headers([], "msg_1", 0, b"{}")
