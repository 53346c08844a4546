"""An httpx transport that sends each request on a connection of its own, over asyncio streams and h11.

Why not httpx's own async transport: it runs httpcore's connection pool over anyio. The pool keeps every
open connection in one list and scans it on each request and each closed response, and anyio adds a
cancel scope to every read and write — together about a third of the CPU one webhook process spent per
delivery (``bench/webhook_rate.py``), and the pool's scans grow with the attempts in flight. A webhook
request needs none of it: it never shares a connection (pinned IP, ``Connection: close``), its total
time is bounded by the attempt's ``asyncio.timeout``, and only the status line and headers of the answer
are read. So this transport opens a connection (TLS with the request's ``sni_hostname``, as httpcore
does), lets h11 — the HTTP/1.1 state machine httpcore itself uses — write the request and parse the
response head, and closes the connection with the response. Failures are raised as the httpx exceptions
httpcore would give (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``, ``RemoteProtocolError``…),
so callers classify them the same way.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import h11
import httpx

#: Bytes asked of the socket per read.
READ_SIZE = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


class _Connection:
    """One connection, one exchange: write the request, read the response head (and, if asked, body)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read_s: float | None
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._read_s = read_s
        self._h11 = h11.Connection(h11.CLIENT)

    async def send(self, request: httpx.Request, write_s: float | None) -> None:
        body = await request.aread()
        head = h11.Request(
            method=request.method, target=request.url.raw_path, headers=list(request.headers.raw)
        )
        data = self._h11.send(head) or b""
        if body:
            data += self._h11.send(h11.Data(data=body)) or b""
        data += self._h11.send(h11.EndOfMessage()) or b""
        self._writer.write(data)
        try:
            async with asyncio.timeout(write_s):
                await self._writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout("timed out sending the request") from None
        except OSError as exc:
            raise httpx.WriteError(str(exc)) from exc

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                async with asyncio.timeout(self._read_s):
                    chunk = await self._reader.read(READ_SIZE)
            except TimeoutError:
                raise httpx.ReadTimeout("timed out reading the response") from None
            except OSError as exc:
                raise httpx.ReadError(str(exc)) from exc
            self._h11.receive_data(chunk)  # b"" at end of stream: h11 then says how it ended

    async def response_head(self) -> h11.Response:
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.InformationalResponse):
                continue  # 1xx: the real answer follows
            if isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("the server closed the connection without answering")
            raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} before the response")

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    def close(self) -> None:
        self._writer.transport.abort()  # nothing more to say or hear: no lingering close handshake


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._connection.body():
            yield chunk

    async def aclose(self) -> None:
        self._connection.close()


class OneShotTransport(httpx.AsyncBaseTransport):
    """Each request on a new connection, closed with its response; HTTP/1.1 only, no proxy. Called
    directly (``attempt_delivery_async``) or under an ``httpx.AsyncClient``."""

    def __init__(self, *, verify: ssl.SSLContext | bool = True) -> None:
        self._ssl_context = (
            verify
            if isinstance(verify, ssl.SSLContext)
            else httpx.create_ssl_context(verify=verify, trust_env=False)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        tls = url.scheme == "https"
        port = url.port or _DEFAULT_PORTS.get(url.scheme, 80)
        server_hostname = request.extensions.get("sni_hostname") or url.host if tls else None
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                reader, writer = await asyncio.open_connection(
                    url.host,
                    port,
                    ssl=self._ssl_context if tls else None,
                    server_hostname=server_hostname,
                    limit=READ_SIZE,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out connecting") from None
        except OSError as exc:  # refused, unreachable, and TLS failures (ssl.SSLError is an OSError)
            raise httpx.ConnectError(str(exc)) from exc
        connection = _Connection(reader, writer, timeouts.get("read"))
        try:
            await connection.send(request, timeouts.get("write"))
            head = await connection.response_head()
        except BaseException:
            connection.close()
            raise
        return httpx.Response(
            status_code=head.status_code,
            headers=list(head.headers),
            stream=_ResponseStream(connection),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": bytes(head.reason)},
        )
