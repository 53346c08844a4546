"""Limits before authentication (issue #16 case 8), against the API as the images run it: a uvicorn
subprocess started with ``devtools.stack.uvicorn_command(production=True)`` (httptools with
``api.http_protocol.LimitedHttpProtocol``), its memory read from ``/proc``.

- Four unfinished 16 MiB headers: each refused 431 once past ``DARKROOM_HTTP_MAX_HEADER_BYTES``, and the
  API's RSS barely moves (before: every byte was buffered, +64 MiB and more).
- 300 silent sockets (past ``DARKROOM_HTTP_MAX_PENDING_CONNECTIONS``): a new request is still served at
  once, and the silent ones are closed within ``DARKROOM_HTTP_HEADER_TIMEOUT`` (before: held forever).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.net import free_port
from devtools.redis_server import RedisServer
from devtools.stack import ROOT, uvicorn_command

LOOPBACK = "127.0.0.1"
HEADER_TIMEOUT_S = 2.0
MAX_PENDING = 64
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def api(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {
        **os.environ,
        "DARKROOM_REDIS_URL": redis_server.url,
        "DARKROOM_STORAGE_URL": f"file://{tmp_path_factory.mktemp('limits-outputs')}",
        "DARKROOM_AUTH_DISABLED": "true",
        "DARKROOM_HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT_S),
        "DARKROOM_HTTP_MAX_PENDING_CONNECTIONS": str(MAX_PENDING),
    }
    log = (tmp_path_factory.mktemp("limits-log") / "api.log").open("wb")
    process = subprocess.Popen(
        uvicorn_command(port, production=True), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, Path(log.name).read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "API did not start"
            time.sleep(0.1)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_reply(sock: socket.socket) -> bytes:
    """What the server sent before closing (empty if it closed without a word)."""
    sock.settimeout(10)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


def test_unfinished_huge_headers_are_refused_at_a_bounded_cost(api: tuple[str, int]) -> None:
    url, pid = api
    before = rss_mib(pid)
    chunk = b"a" * MiB
    sockets = []
    for _ in range(4):
        sock = connect(url)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < 16 * MiB:  # never finished: no CRLF
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed mid-way: what should happen
        sockets.append(sock)
    peak = rss_mib(pid)
    replies = [read_reply(sock) for sock in sockets]
    for sock in sockets:
        sock.close()
    statuses = [reply.split(b"\r\n", 1)[0].decode() or "(closed)" for reply in replies]
    print(f"4 unfinished 16 MiB headers: API RSS {before:.0f} -> {peak:.0f} MiB; replies {statuses}")
    assert all(status == "HTTP/1.1 431 Request Header Fields Too Large" for status in statuses), replies
    assert b"request_header_fields_too_large" in replies[0]
    assert peak - before < 16, f"RSS grew {peak - before:.0f} MiB"
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_silent_sockets_neither_stop_new_requests_nor_stay_open(api: tuple[str, int]) -> None:
    url, pid = api
    before = rss_mib(pid)
    silent = [connect(url) for _ in range(300)]
    started = time.monotonic()
    response = httpx.get(f"{url}/healthz", timeout=5)
    served_s = time.monotonic() - started
    assert response.status_code == 200
    # A connection that sent part of a head and stopped: 408, once the deadline passes.
    slow = connect(url)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    closed = 0
    deadline = time.monotonic() + HEADER_TIMEOUT_S + 5
    for sock in silent:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            closed += sock.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass
    slow_reply = read_reply(slow)
    slow_status = slow_reply.split(b"\r\n", 1)[0].decode()
    held_s = time.monotonic() - started
    print(
        f"300 silent sockets: a new request served in {served_s * 1000:.0f} ms; {closed} of 300 closed "
        f"by the server within {held_s:.1f} s; partial head -> {slow_status}; "
        f"API RSS {before:.0f} -> {rss_mib(pid):.0f} MiB"
    )
    for sock in [*silent, slow]:
        sock.close()
    assert served_s < 2
    assert closed == 300
    assert slow_reply.startswith(b"HTTP/1.1 408 ")
