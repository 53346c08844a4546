"""The load generator against a real loopback HTTP/1.1 server: keep-alive, chunked bodies, both loops."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.http_load import HttpConnection, build_request, closed_loop, open_loop, run


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"world"):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        body = b'{"ok": true}'
        self.send_response(404 if self.path == "/missing" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_one_connection_reads_length_and_chunked_bodies(server: tuple[str, int]) -> None:
    host, port = server

    async def go() -> list[tuple[int, bytes]]:
        connection = await HttpConnection.open(host, port)
        try:
            return [
                await connection.request(build_request("GET", "/", f"{host}:{port}")),
                await connection.request(build_request("GET", "/chunked", f"{host}:{port}")),
                await connection.request(build_request("GET", "/missing", f"{host}:{port}")),
            ]
        finally:
            await connection.close()

    assert run(go) == [(200, b'{"ok": true}'), (200, b"hello world"), (404, b'{"ok": true}')]


def test_closed_loop_is_bounded_by_count(server: tuple[str, int]) -> None:
    host, port = server
    raw = build_request("GET", "/", f"{host}:{port}")
    result = run(closed_loop(host, port, lambda i: raw, concurrency=4, max_requests=50, max_seconds=20))
    assert result.completed == 50
    assert result.statuses == {200: 50}
    report = result.report()
    assert report["latency_ms"]["n"] == 50 and report["throughput_per_s"] > 0


def test_open_loop_keeps_its_schedule(server: tuple[str, int]) -> None:
    host, port = server
    raw = build_request("GET", "/", f"{host}:{port}")
    result = run(open_loop(host, port, lambda i: raw, rate=100, duration_s=0.3))
    assert result.requested == 30
    assert result.completed == 30
    # Counted from the scheduled instant, never from a later one (a timer may fire a hair early).
    assert all(
        latency >= service - 0.002
        for latency, service in zip(result.latencies_s, result.service_s, strict=False)
    )
