"""Outbound webhooks: Standard Webhooks signing, retry rules, and delivery through the SSRF guard.

``dispatcher`` turns the events status changes wrote to the outbox into deliveries, ``scheduling`` queues
their attempts, ``tasks`` makes one attempt; ``signing`` knows the wire format, ``retry`` decides when to
try again, ``delivery`` does the HTTP.
"""

from services.webhooks.delivery import (
    AttemptResult,
    DeliveryAttempt,
    DeliveryOutcome,
    WebhookMessage,
    attempt_delivery,
    deliver,
    make_webhook_client,
    new_msg_id,
)
from services.webhooks.retry import RetryPolicy, Verdict, classify, next_delay, parse_retry_after
from services.webhooks.signing import decode_secret, generate_secret, sign, webhook_headers

__all__ = [
    "AttemptResult",
    "DeliveryAttempt",
    "DeliveryOutcome",
    "RetryPolicy",
    "Verdict",
    "WebhookMessage",
    "attempt_delivery",
    "classify",
    "decode_secret",
    "deliver",
    "generate_secret",
    "make_webhook_client",
    "new_msg_id",
    "next_delay",
    "parse_retry_after",
    "sign",
    "webhook_headers",
]
