"""SSRF guard for URLs that API clients hand us (webhook targets).

Why: a webhook URL is attacker-controlled input that our worker turns into an outbound request from
inside our network. Unchecked, it reaches Redis, the S3 endpoint, the cloud metadata service (instance
credentials) or any other private host, and the status codes and timings we record leak what is there.

How, in two halves that must be used together:

1. ``vet_url`` parses the URL with httpx's own parser (the same one that sends the request, so no parser
   differential between "what we checked" and "where we connect"), resolves the host **once**, and
   refuses if **any** resolved address is non-public. Checking every address rather than the first stops
   a name that resolves to ``[public, 127.0.0.1]`` from slipping through.
2. ``build_pinned_request`` makes the request **to the vetted IP**: the URL's host is rewritten to the IP,
   so httpx never performs a second DNS lookup that a rebinding DNS server could answer with
   ``127.0.0.1``. The original name is kept where it matters: the ``Host`` header (virtual hosting), and,
   for https, httpx/httpcore's ``sni_hostname`` request extension, which is used both as the TLS SNI and
   as the name the certificate is verified against. Certificate checks therefore still apply to the
   hostname the client registered, not to the IP.

Connection reuse is switched off for pinned requests (``Connection: close``): httpx pools connections by
(scheme, host, port) and the host is now an IP, so two hostnames sharing a CDN IP could otherwise share a
TLS connection that was verified for only one of them.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Resolves ``(host, port)`` to IP address strings; injectable so tests never touch real DNS.
Resolver = Callable[[str, int], Sequence[str]]

#: Cloud instance-metadata endpoints. Refused even with ``allow_private``: no legitimate webhook targets
#: them, and a leak hands out the machine's cloud credentials. 168.63.129.16 is Azure's platform address,
#: which is a *public* IP and would otherwise pass the generic checks.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
        ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("168.63.129.16"),  # Azure wire server
    }
)

#: NAT64 well-known prefix: the last 32 bits are the IPv4 address a NAT64 gateway will connect to.
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
#: NAT64 local-use prefix: site-specific embedding, so the IPv4 address cannot be read back; refused.
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UnsafeURLError(ValueError):
    """A URL we refuse to send requests to.

    ``reason`` is a stable machine code for API errors and metrics: ``invalid_url``, ``scheme_not_allowed``,
    ``userinfo_not_allowed``, ``missing_host``, ``dns_resolution_failed``, ``private_address``,
    ``metadata_address``. Only ``dns_resolution_failed`` may be transient.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VettedTarget:
    """A URL that passed ``vet_url``, together with the address the request must go to."""

    url: str
    scheme: str
    #: ASCII (IDNA-encoded) host as the client wrote it: what goes into ``Host`` and TLS SNI.
    hostname: str
    port: int
    #: The address to connect to (the resolver's first, i.e. preferred, answer).
    ip: str
    #: Every address the name resolved to; all of them were checked.
    addresses: tuple[str, ...]

    def pinned_url(self) -> httpx.URL:
        """The original URL with its host replaced by the vetted IP (port, path and query kept)."""
        return httpx.URL(self.url).copy_with(host=self.ip)

    def host_header(self) -> str:
        """``Host`` header value for the original name, with the port only when it is not the default."""
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def resolve_host(host: str, port: int) -> list[str]:
    """Resolve with the system resolver (``getaddrinfo``), keeping order and dropping duplicates."""
    addresses: list[str] = []
    for family, _type, _proto, _canon, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family in (socket.AF_INET, socket.AF_INET6):
            ip = str(sockaddr[0])
            if ip not in addresses:
                addresses.append(ip)
    return addresses


def address_category(address: str | IPAddress) -> str | None:
    """Return why an address is not a public destination (``"loopback"``, ``"metadata"``, ...), or None.

    Why a deny-by-default test (``is_global``) plus explicit checks instead of a hand-written list of
    private ranges: Python's registry tables cover the odd corners (198.18/15, documentation ranges,
    100.64/10 CGNAT, 0/8, ...) that hand-written lists forget. IPv6 forms that embed an IPv4 address
    are judged by the address they carry, because that is where the packet can end up: IPv4-mapped and
    NAT64 addresses by that address alone (DNS64 networks hand out ``64:ff9b::8.8.8.8`` for ordinary
    IPv4-only hosts), 6to4 and Teredo by both it and the IPv6 address itself.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(int(ip))  # drop any "%zone": it would defeat the equality checks below
        translated = _translated_ipv4(ip)
        if translated is not None:
            return address_category(translated)
        tunnelled = _tunnelled_ipv4(ip)
        if tunnelled is not None and (category := address_category(tunnelled)) is not None:
            return category
    if ip in METADATA_ADDRESSES:
        return "metadata"
    checks: tuple[tuple[bool, str], ...] = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link_local"),
        (ip.is_multicast, "multicast"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "cgnat"),
        (isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64_LOCAL_USE, "private"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "private"),
        (not ip.is_global, "not_global"),
    )
    return next((name for matched, name in checks if matched), None)


def _translated_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """IPv4-mapped and NAT64 (well-known prefix) forms: the IPv4 address *is* the destination."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _tunnelled_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """6to4 and Teredo: the IPv4 address is a tunnel endpoint; it and the IPv6 address must both pass."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # (server, client): traffic is tunnelled to the client address
    return None


def vet_url(
    url: str,
    *,
    allow_private: bool,
    allow_http: bool = False,
    resolver: Resolver = resolve_host,
) -> VettedTarget:
    """Check a user-supplied URL and resolve it once; raise ``UnsafeURLError`` if it must not be called.

    - ``https`` only, unless ``allow_http`` (tests and local development talk plain http to loopback).
    - No ``user:password@``: credentials in URLs end up in logs, and they are a classic way to disguise
      the real host (``https://trusted.com@evil.com``).
    - Any port is fine: the address checks are what keep us off internal services.
    - ``allow_private`` lets loopback/private targets through (tests, a receiver on the same LAN) but
      never the cloud metadata addresses.

    Vet right before each request and send it with ``build_pinned_request``: the answer is a snapshot of
    DNS, so a target vetted minutes ago may now resolve elsewhere.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UnsafeURLError("invalid_url", str(exc)) from exc
    if parsed.scheme not in _DEFAULT_PORTS or (parsed.scheme == "http" and not allow_http):
        allowed = "http or https" if allow_http else "https"
        raise UnsafeURLError("scheme_not_allowed", f"scheme {parsed.scheme!r} is not allowed (use {allowed})")
    if parsed.userinfo:
        raise UnsafeURLError("userinfo_not_allowed", "credentials in the URL are not allowed")
    hostname = parsed.raw_host.decode("ascii")
    if not hostname:
        raise UnsafeURLError("missing_host", "the URL has no host")
    port = parsed.port if parsed.port is not None else _DEFAULT_PORTS[parsed.scheme]

    try:
        addresses = tuple(resolver(hostname, port))
    except (OSError, UnicodeError) as exc:
        raise UnsafeURLError("dns_resolution_failed", f"cannot resolve {hostname!r}: {exc}") from exc
    if not addresses:
        raise UnsafeURLError("dns_resolution_failed", f"{hostname!r} resolved to no address")

    for address in addresses:
        try:
            category = address_category(address)
        except ValueError as exc:  # a resolver returning something that is not an IP: refuse, don't guess
            raise UnsafeURLError("invalid_url", f"resolver returned {address!r}") from exc
        if category == "metadata":
            raise UnsafeURLError("metadata_address", f"{hostname!r} resolves to {address} (cloud metadata)")
        if category is not None and not allow_private:
            raise UnsafeURLError("private_address", f"{hostname!r} resolves to {address} ({category})")

    return VettedTarget(
        url=url,
        scheme=parsed.scheme,
        hostname=hostname,
        port=port,
        ip=addresses[0],
        addresses=addresses,
    )


def build_pinned_request(
    client: httpx.Client | httpx.AsyncClient,
    target: VettedTarget,
    method: str,
    *,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx.Request:
    """Build a request that connects to ``target.ip`` while speaking to ``target.hostname``.

    Send it with ``client.send(request, follow_redirects=False)``: following a redirect would make httpx
    resolve and connect to an unvetted host. The client should have ``trust_env=False`` (see
    ``make_webhook_client``) so an environment proxy does not take over name resolution.
    """
    merged, extensions = _pinning(target, headers)
    return client.build_request(
        method, target.pinned_url(), content=content, headers=merged, extensions=extensions
    )


def pinned_request(
    target: VettedTarget,
    method: str,
    *,
    content: bytes,
    headers: Mapping[str, str],
    timeout: httpx.Timeout,
) -> httpx.Request:
    """``build_pinned_request`` without a client, for a transport called directly (the webhook event
    loop, where the client's auth, redirect and cookie layers were a tenth of the CPU per delivery and
    did nothing: no auth, redirects not followed, cookies refused). ``headers`` must be complete (the
    client's defaults are not added)."""
    merged, extensions = _pinning(target, headers)
    extensions["timeout"] = timeout.as_dict()
    return httpx.Request(method, target.pinned_url(), content=content, headers=merged, extensions=extensions)


def _pinning(target: VettedTarget, headers: Mapping[str, str] | None) -> tuple[httpx.Headers, dict[str, Any]]:
    merged = httpx.Headers(headers)
    merged["Host"] = target.host_header()
    merged["Connection"] = "close"  # no pooled reuse across hostnames sharing an IP (module docstring)
    extensions: dict[str, Any] = {"sni_hostname": target.hostname} if target.scheme == "https" else {}
    return merged, extensions
