"""SSRF guard: which targets are refused, and that pinned requests really go to the vetted IP.

Public targets are only *validated* here — a ``no_outbound_connections`` guard makes any connect attempt
fail the test. Real traffic goes to loopback receivers only.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.ssrf import UnsafeURLError, address_category, build_pinned_request, vet_url
from services.webhooks.delivery import make_webhook_client
from tests.fixtures.http_receiver import HttpReceiver


def fake_dns(table: dict[str, Sequence[str]]) -> Callable[[str, int], Sequence[str]]:
    """A resolver answering from ``table`` (unknown names fail like NXDOMAIN); no real DNS traffic."""

    def resolve(host: str, port: int) -> Sequence[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


@pytest.fixture
def no_outbound_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if vetting a URL ever tried to connect anywhere."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("vetting must not open connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- addresses ---------------------------------------------------------------------------------------

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("169.254.1.1", "link_local"),
    ("fe80::1", "link_local"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.254", "cgnat"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "metadata"),
    ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "private"),  # Teredo, public client: Teredo itself refused
    ("64:ff9b::a00:1", "private"),  # NAT64 wrapping 10.0.0.1
    ("64:ff9b:1::1", "private"),  # NAT64 local-use prefix
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("fc00::1", "private"),
    ("198.18.0.1", "private"),  # benchmarking range
    ("192.0.2.10", "private"),  # documentation range
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # DNS64 answer for an IPv4-only public host
    "2002:808:808::1",  # 6to4 through a public address
]


@pytest.mark.parametrize(("address", "category"), REFUSED)
def test_non_public_addresses_are_categorised(address: str, category: str) -> None:
    assert address_category(address) == category


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert address_category(address) is None


@pytest.mark.usefixtures("no_outbound_connections")
@pytest.mark.parametrize(("address", "category"), REFUSED)
def test_literal_non_public_urls_are_refused(address: str, category: str) -> None:
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(UnsafeURLError) as caught:
        vet_url(f"https://{host}/hook", allow_private=False)
    assert caught.value.reason == ("metadata_address" if category == "metadata" else "private_address")


@pytest.mark.usefixtures("no_outbound_connections")
@pytest.mark.parametrize(
    "url",
    [
        "https://localhost/hook",  # resolved by the real system resolver (hosts file): no traffic
        # Numeric spellings that getaddrinfo (inet_aton) reads as 127.0.0.1 without any DNS query.
        "https://2130706433/hook",
        "https://0x7f.1/hook",
        "https://127.1/hook",
    ],
)
def test_names_and_odd_spellings_of_loopback_are_refused(url: str) -> None:
    with pytest.raises(UnsafeURLError) as caught:
        vet_url(url, allow_private=False)
    assert caught.value.reason == "private_address"


@pytest.mark.usefixtures("no_outbound_connections")
def test_one_private_answer_among_public_ones_is_enough_to_refuse() -> None:
    dns = fake_dns({"hooks.example.com": ["93.184.215.14", "127.0.0.1"]})
    with pytest.raises(UnsafeURLError, match="127.0.0.1") as caught:
        vet_url("https://hooks.example.com/hook", allow_private=False, resolver=dns)
    assert caught.value.reason == "private_address"


@pytest.mark.usefixtures("no_outbound_connections")
@pytest.mark.parametrize("address", PUBLIC)
def test_public_targets_are_accepted_without_connecting(address: str) -> None:
    dns = fake_dns({"hooks.example.com": [address]})
    target = vet_url("https://hooks.example.com:8443/a/b?c=1", allow_private=False, resolver=dns)

    assert (target.ip, target.hostname, target.port) == (address, "hooks.example.com", 8443)
    assert target.host_header() == "hooks.example.com:8443"
    assert target.pinned_url().host == address
    assert target.pinned_url().port == 8443
    assert target.pinned_url().raw_path == b"/a/b?c=1"


@pytest.mark.usefixtures("no_outbound_connections")
def test_public_ip_literal_is_accepted_with_the_real_resolver() -> None:
    target = vet_url("https://8.8.8.8/hook", allow_private=False)
    assert target.ip == "8.8.8.8"
    assert target.host_header() == "8.8.8.8"


def test_allow_private_lets_loopback_through_but_never_metadata() -> None:
    assert vet_url("http://127.0.0.1:9/x", allow_private=True, allow_http=True).ip == "127.0.0.1"
    assert vet_url("https://[::1]/x", allow_private=True).host_header() == "[::1]"
    with pytest.raises(UnsafeURLError) as caught:
        vet_url("http://169.254.169.254/latest/meta-data/", allow_private=True, allow_http=True)
    assert caught.value.reason == "metadata_address"


def test_unresolvable_names_are_reported_as_such() -> None:
    with pytest.raises(UnsafeURLError) as caught:
        vet_url("https://nowhere.test/hook", allow_private=False, resolver=fake_dns({}))
    assert caught.value.reason == "dns_resolution_failed"


# --- URL shape -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allow_http", "reason"),
    [
        ("http://8.8.8.8/hook", False, "scheme_not_allowed"),
        ("ftp://8.8.8.8/hook", True, "scheme_not_allowed"),
        ("file:///etc/passwd", True, "scheme_not_allowed"),
        ("gopher://8.8.8.8:6379/_INFO", True, "scheme_not_allowed"),
        ("8.8.8.8/hook", True, "scheme_not_allowed"),
        ("https://user:pw@8.8.8.8/hook", False, "userinfo_not_allowed"),
        ("https://8.8.8.8@127.0.0.1/hook", False, "userinfo_not_allowed"),
        ("https:///hook", False, "missing_host"),
        ("https://[::1/hook", False, "invalid_url"),
    ],
)
def test_url_shape_rules(url: str, allow_http: bool, reason: str) -> None:
    with pytest.raises(UnsafeURLError) as caught:
        vet_url(url, allow_private=False, allow_http=allow_http)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)


def test_http_is_allowed_only_when_asked() -> None:
    assert vet_url("http://8.8.8.8/hook", allow_private=False, allow_http=True).port == 80


# --- pinning over real sockets ---------------------------------------------------------------------------


def test_plain_http_request_goes_to_the_vetted_ip_with_the_original_host_header(
    webhook_receiver: HttpReceiver,
) -> None:
    """``hooks.test`` does not exist in real DNS: the request can only arrive if httpx skipped its lookup."""
    dns = fake_dns({"hooks.test": ["127.0.0.1"]})
    target = vet_url(
        f"http://hooks.test:{webhook_receiver.port}/hook?x=1",
        allow_private=True,
        allow_http=True,
        resolver=dns,
    )
    with make_webhook_client(5.0) as client:
        request = build_pinned_request(client, target, "POST", content=b"{}", headers={"host": "evil"})
        response = client.send(request)

    assert response.status_code == 200
    (seen,) = webhook_receiver.wait_for(1)
    assert seen.headers["host"] == f"hooks.test:{webhook_receiver.port}"
    assert seen.headers["connection"] == "close"
    assert seen.path == "/hook?x=1"


def _self_signed(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A certificate for ``name`` only (no IP SAN): a server context and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    return server, ssl.create_default_context(cafile=str(cert_path))


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[HttpReceiver, ssl.SSLContext]]:
    server_ctx, client_ctx = _self_signed(tmp_path, "hooks.test")
    with HttpReceiver(ssl_context=server_ctx) as receiver:
        yield receiver, client_ctx


def test_https_pinning_verifies_the_certificate_for_the_original_hostname(
    tls_receiver: tuple[HttpReceiver, ssl.SSLContext],
) -> None:
    """The certificate names ``hooks.test``, not 127.0.0.1: this passes only because SNI and the
    hostname check use ``sni_hostname`` while the socket goes to the pinned IP."""
    receiver, client_ctx = tls_receiver
    dns = fake_dns({"hooks.test": ["127.0.0.1"]})
    target = vet_url(f"https://hooks.test:{receiver.port}/hook", allow_private=True, resolver=dns)
    with make_webhook_client(5.0, verify=client_ctx) as client:
        response = client.send(build_pinned_request(client, target, "POST", content=b"{}"))

    assert response.status_code == 200
    assert receiver.wait_for(1)[0].headers["host"] == f"hooks.test:{receiver.port}"


def test_https_pinning_still_rejects_a_certificate_for_another_name(
    tls_receiver: tuple[HttpReceiver, ssl.SSLContext],
) -> None:
    receiver, client_ctx = tls_receiver
    dns = fake_dns({"other.test": ["127.0.0.1"]})
    target = vet_url(f"https://other.test:{receiver.port}/hook", allow_private=True, resolver=dns)
    with (
        make_webhook_client(5.0, verify=client_ctx) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|match"),
    ):
        client.send(build_pinned_request(client, target, "POST", content=b"{}"))
    assert receiver.requests == []
