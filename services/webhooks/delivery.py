"""Sending one webhook message: a single attempt, and a blocking retry loop built on it.

Why split: a future RQ task calls ``attempt_delivery`` once per job execution, records the attempt, and
re-enqueues itself after ``next_delay(...)`` seconds; ``deliver`` is the same thing with ``sleep`` in
between, for scripts and tests. Everything the functions need (client, secret, policy, flags, clock) is
passed in, so nothing here reads settings or touches Redis.

A message keeps one ``webhook-id`` across all of its attempts, so receivers can deduplicate a retry of a
delivery they did process but failed to acknowledge; the timestamp and signature are fresh per attempt,
so a slow retry is not rejected by the receiver's replay window.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
from pydantic import BaseModel, ConfigDict

from services.jobs.outbox import new_msg_id
from services.ssrf import (
    Resolver,
    UnsafeURLError,
    build_pinned_request,
    pinned_request,
    resolve_host,
    vet_url,
)
from services.webhooks.deadline import DeadlineTransport, attempt_deadline
from services.webhooks.retry import RetryPolicy, Verdict, classify, next_delay
from services.webhooks.signing import webhook_headers

USER_AGENT = "darkroom-webhooks/1"
_MAX_ERROR_CHARS = 500


def utcnow() -> datetime:
    """Default clock: aware UTC ``datetime`` (signatures use its whole seconds)."""
    return datetime.now(UTC)


class DeliveryAttempt(BaseModel):
    """One HTTP attempt, as stored on the job for users and operators to see."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    attempt: int
    #: The receiver's status, or None when no response came back (network error, timeout, unsafe URL).
    status_code: int | None
    #: What went wrong when the status code alone does not say it; None for plain 2xx/4xx/5xx answers.
    error: str | None
    duration_ms: float


class DeliveryOutcome(BaseModel):
    """The end of a message's life: delivered, gone (disable the endpoint), or neither (failed)."""

    model_config = ConfigDict(frozen=True)

    msg_id: str
    event_type: str
    delivered: bool
    gone: bool
    attempts: list[DeliveryAttempt]


@dataclass(frozen=True)
class WebhookMessage:
    """What is sent, identical on every attempt. Holds no secret, so it can sit in a job's arguments."""

    url: str
    #: For logs and the outcome only. Receivers must read the type from the signed body: a header would
    #: not be covered by the signature.
    event_type: str
    payload: bytes
    msg_id: str


@dataclass(frozen=True)
class AttemptResult:
    """One attempt's record, its verdict, and the raw outcome ``next_delay`` needs (closed response)."""

    record: DeliveryAttempt
    verdict: Verdict
    outcome: httpx.Response | Exception


def make_webhook_client(timeout_s: float, *, verify: ssl.SSLContext | bool = True) -> httpx.Client:
    """An httpx client fit for calling strangers' servers.

    - Explicit timeouts on every phase: a receiver that accepts the connection and never answers must
      not hold a worker. A server trickling bytes would stretch an attempt past them, so the transport
      also enforces the total deadline ``attempt_delivery`` is given (``services.webhooks.deadline``).
    - ``follow_redirects=False``: a redirect target was never vetted by the SSRF guard.
    - ``trust_env=False``: ambient proxy and CA variables must not silently change where webhook traffic
      goes or which CAs vouch for receivers; an egress proxy, if ever needed, is wired explicitly.
    - No keep-alive pool and a cookie jar that refuses everything: requests are pinned to IPs, so pooled
      connections and cookies would otherwise be shared between unrelated receivers behind one IP.
      No cap on connections: the webhook worker bounds how many attempts run at once.
    """
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    return httpx.Client(
        timeout=httpx.Timeout(timeout_s, connect=timeout_s, read=timeout_s, write=timeout_s, pool=timeout_s),
        follow_redirects=False,
        trust_env=False,
        transport=DeadlineTransport(verify=verify, limits=limits),
        cookies=_refuse_all_cookies(),
        headers={"User-Agent": USER_AGENT},
    )


def _refuse_all_cookies() -> CookieJar:
    """A jar whose policy accepts no domain. Passed as a bare ``CookieJar`` on purpose: httpx keeps a bare
    jar as it is, but copies an ``httpx.Cookies`` into a fresh default jar, dropping the policy."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def attempt_delivery(
    client: httpx.Client,
    message: WebhookMessage,
    secret: str,
    attempt: int,
    *,
    allow_private: bool,
    allow_http: bool,
    clock: Callable[[], datetime] = utcnow,
    resolver: Resolver = resolve_host,
    deadline_s: float | None = None,
) -> AttemptResult:
    """Vet the URL, sign, POST once, and report. Never raises for receiver or network trouble.

    ``deadline_s`` bounds connect, TLS, sending and the response headers together (with a client from
    ``make_webhook_client``): past it the attempt ends as a ``ReadTimeout`` (or Connect/Write), however
    slowly the receiver keeps trickling bytes.

    A bad ``secret`` raises ``ValueError`` before anything is sent: that is our misconfiguration, not a
    delivery failure to retry. The response body is never read — we only need the status, and a hostile
    receiver could send gigabytes.
    """
    at = clock()
    headers = webhook_headers(secret, message.msg_id, int(at.timestamp()), message.payload)
    started = time.perf_counter()
    outcome: httpx.Response | Exception
    try:
        target = vet_url(message.url, allow_private=allow_private, allow_http=allow_http, resolver=resolver)
        request = build_pinned_request(client, target, "POST", content=message.payload, headers=headers)
        with attempt_deadline(deadline_s):
            outcome = client.send(request, stream=True, follow_redirects=False)
            outcome.close()
    except (UnsafeURLError, httpx.TransportError) as exc:
        outcome = exc
    return _result(at, attempt, started, outcome)


async def attempt_delivery_async(
    transport: httpx.AsyncBaseTransport,
    message: WebhookMessage,
    secret: str,
    attempt: int,
    *,
    allow_private: bool,
    allow_http: bool,
    timeout: httpx.Timeout,
    clock: Callable[[], datetime] = utcnow,
    resolver: Resolver = resolve_host,
    deadline_s: float | None = None,
) -> AttemptResult:
    """:func:`attempt_delivery` on an event loop, through ``transport`` (``services.webhooks.one_shot``)
    called directly: many attempts wait on their receivers at once in one thread, which is what lets one
    webhook process keep hundreds of slow receivers busy (threads spent their time handing the
    interpreter lock around). No client: its auth, redirect and cookie layers had nothing to do here
    (redirects are not followed, cookies are refused) and cost a tenth of the CPU of a delivery.

    ``timeout`` bounds each phase as the client's would; ``deadline_s`` bounds connect, TLS, sending and
    the response headers together as one ``asyncio.timeout``; past it the attempt ends as a
    ``ReadTimeout`` with the same message the synchronous deadline gives. A host name (not an IP literal)
    is resolved in a thread, so a slow DNS answer holds this attempt only.
    """
    at = clock()
    headers = webhook_headers(secret, message.msg_id, int(at.timestamp()), message.payload)
    headers["User-Agent"] = USER_AGENT
    started = time.perf_counter()
    outcome: httpx.Response | Exception
    try:
        vet = functools.partial(
            vet_url, message.url, allow_private=allow_private, allow_http=allow_http, resolver=resolver
        )
        target = vet() if _is_ip_literal(message.url) else await asyncio.to_thread(vet)
        request = pinned_request(target, "POST", content=message.payload, headers=headers, timeout=timeout)
        try:
            async with asyncio.timeout(deadline_s):
                outcome = await transport.handle_async_request(request)
                await outcome.aclose()
        except TimeoutError:
            raise httpx.ReadTimeout(f"attempt deadline of {deadline_s:g}s exceeded") from None
    except (UnsafeURLError, httpx.TransportError) as exc:
        outcome = exc
    # The connection was aborted; the loop closes its socket on its next turn. Take that turn here, so
    # that when the caller hands this attempt's share to another, the receiver's connection is gone.
    await asyncio.sleep(0)
    return _result(at, attempt, started, outcome)


def _is_ip_literal(url: str) -> bool:
    """Whether the URL's host is an IP address (nothing to resolve); False when unparseable."""
    try:
        ipaddress.ip_address(httpx.URL(url).host)
    except (ValueError, httpx.InvalidURL, TypeError):
        return False
    return True


def _result(at: datetime, attempt: int, started: float, outcome: httpx.Response | Exception) -> AttemptResult:
    """The attempt's record (what users see on the job) and verdict, from what the exchange ended with."""
    duration_ms = (time.perf_counter() - started) * 1000.0
    error: str | None = None
    if isinstance(outcome, Exception):
        error = f"{type(outcome).__name__}: {outcome}"[:_MAX_ERROR_CHARS]
    status_code = outcome.status_code if isinstance(outcome, httpx.Response) else None
    if status_code is not None and 300 <= status_code < 400:
        error = "redirect not followed"
    record = DeliveryAttempt(
        at=at, attempt=attempt, status_code=status_code, error=error, duration_ms=duration_ms
    )
    return AttemptResult(record=record, verdict=classify(outcome), outcome=outcome)


def deliver(
    client: httpx.Client,
    url: str,
    event_type: str,
    payload: bytes,
    secret: str,
    *,
    policy: RetryPolicy | None = None,
    allow_private: bool = False,
    allow_http: bool = False,
    msg_id: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], datetime] = utcnow,
    rand: Callable[[], float] = random.random,
    resolver: Resolver = resolve_host,
    on_attempt: Callable[[DeliveryAttempt], None] | None = None,
) -> DeliveryOutcome:
    """Deliver ``payload`` (already-serialised JSON bytes) with retries; block until a final outcome.

    Pass ``msg_id`` to keep the id stable when the same event is delivered again (e.g. a re-enqueued
    job); otherwise a new one is generated. ``on_attempt`` sees every attempt as it happens (persist it,
    count it). ``sleep``, ``clock``, ``rand`` and ``resolver`` are injectable so tests run without real
    waiting, real time or real DNS.
    """
    policy = policy or RetryPolicy()
    message = WebhookMessage(url=url, event_type=event_type, payload=payload, msg_id=msg_id or new_msg_id())
    attempts: list[DeliveryAttempt] = []
    attempt = 1
    while True:
        result = attempt_delivery(
            client,
            message,
            secret,
            attempt,
            allow_private=allow_private,
            allow_http=allow_http,
            clock=clock,
            resolver=resolver,
        )
        attempts.append(result.record)
        if on_attempt is not None:
            on_attempt(result.record)
        delay = next_delay(attempt, result.outcome, policy, rand=rand, now=clock())
        if delay is None:
            break
        sleep(delay)
        attempt += 1
    return DeliveryOutcome(
        msg_id=message.msg_id,
        event_type=event_type,
        delivered=result.verdict is Verdict.DELIVERED,
        gone=result.verdict is Verdict.GONE,
        attempts=attempts,
    )
