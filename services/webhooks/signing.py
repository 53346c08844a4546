"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

Why this spec rather than a home-made ``X-Signature`` header: receivers can verify with an off-the-shelf
library in any language (``standardwebhooks``, Svix's SDKs), and the spec already answers the questions a
home-made scheme gets wrong — replay protection (the timestamp is signed and checked within a tolerance),
deduplication (a stable ``webhook-id``) and key rotation (several space-separated signatures).

The signed content is ``{msg_id}.{timestamp}.{body}`` with HMAC-SHA256, keyed with the base64-decoded part
of a ``whsec_``-prefixed secret. We sign the exact body bytes that go on the wire, never a re-serialised
copy, because a receiver verifies the bytes it received.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
#: The spec recommends keys of 24–64 bytes; we generate 32 and only refuse empty ones, so secrets minted
#: elsewhere (a receiver migrating from another provider) still work.
GENERATED_KEY_BYTES = 32


def generate_secret(num_bytes: int = GENERATED_KEY_BYTES) -> str:
    """Return a fresh ``whsec_<base64 key>`` secret, in the format receivers' libraries expect."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(num_bytes)).decode("ascii")


def decode_secret(secret: str) -> bytes:
    """Return the HMAC key inside ``whsec_<base64>``, or raise ``ValueError`` saying what is wrong.

    Why strict: a secret that silently decodes to garbage (or to an empty key) would sign every webhook
    with something the receiver can never verify, and nobody would notice until a customer complained.
    Missing ``=`` padding is tolerated because the reference libraries tolerate it too.
    """
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"webhook secret must start with {SECRET_PREFIX!r} (Standard Webhooks format)")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"webhook secret after {SECRET_PREFIX!r} is not valid base64") from exc
    if not key:
        raise ValueError("webhook secret key is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return ``v1,<base64 HMAC-SHA256>`` over ``{msg_id}.{timestamp}.{body}``.

    ``timestamp`` is whole seconds since the epoch, exactly as sent in ``webhook-timestamp``.
    """
    key = decode_secret(secret)
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, to_sign, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def webhook_headers(secret: str | Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Return the headers that make a request a verifiable Standard Webhooks message.

    ``secret`` may be several secrets during a key rotation: each produces one signature and the receiver
    accepts the message if any of them matches, so old and new keys overlap without a flag day.
    """
    all_secrets = [secret] if isinstance(secret, str) else list(secret)
    if not all_secrets:
        raise ValueError("at least one webhook secret is required")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in all_secrets),
        "content-type": "application/json",
    }
