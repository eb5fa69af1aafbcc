"""A small HTTP/1.1 client for relaying to providers: keep-alive connections on asyncio transports, responses
parsed by httptools (the C parser uvicorn uses). It does what a relay needs and nothing else: POST, a body
read whole or line by line, pooled connections, timeouts, TLS. No redirects, cookies, proxies or compression
(it asks for none). Failures are ConnectionError (OSError) or TimeoutError; `gateway.upstream` maps them.

Why not aiohttp's client: it took twice the CPU per request (`scripts/bench_http_client.py`), and was most of
a relayed request's cost (docs/BENCHMARKS.md, benchmark 3).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

IDLE_KEEP_S = 30.0  # an idle connection older than this is closed rather than reused (servers drop them)
PAUSE_AT = 1 << 20  # bytes buffered for a slow reader before the socket stops being read


class Pool:
    """Connections to any number of origins, at most `connections` open at once (a request beyond waits)."""

    def __init__(self, connections: int) -> None:
        self._idle: dict[tuple, collections.deque[_Connection]] = collections.defaultdict(collections.deque)
        self._slots = asyncio.Semaphore(connections)
        self._tls: ssl.SSLContext | None = None
        self._origins: dict[str, tuple] = {}

    def post(self, url, body, headers, connect_timeout, read_timeout) -> _Exchange:
        return _Exchange(self, url, body, headers, connect_timeout, read_timeout)

    async def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    def _origin(self, url: str) -> tuple:
        """(scheme, host, port, path and query) for a URL, parsed once per URL."""
        origin = self._origins.get(url)
        if origin is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url} is not an http(s) URL")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            origin = self._origins[url] = (parts.scheme, parts.hostname, port, path)
        return origin

    async def _connect(self, scheme: str, host: str, port: int, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if scheme == "https" else None
        connecting = loop.create_connection(lambda: _Connection(loop), host, port, ssl=tls)
        _, connection = await asyncio.wait_for(connecting, timeout)
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _checkout(self, key: tuple) -> _Connection | None:
        idle = self._idle[key]
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.reusable() and now - connection.idle_since < IDLE_KEEP_S:
                return connection
            connection.close()
        return None

    def _checkin(self, key: tuple, connection: _Connection) -> None:
        if connection.reusable():
            connection.idle_since = time.monotonic()
            connection.response = None
            self._idle[key].append(connection)
        else:
            connection.close()


class _Exchange:
    """One POST: `async with` gives the response once its headers are in; leaving closes or pools the
    connection."""

    def __init__(self, pool: Pool, url: str, body: bytes, headers: dict[str, str], connect_timeout: float,
                 read_timeout: float):  # fmt: skip
        self._pool, self._url, self._body, self._headers = pool, url, body, headers
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._connection: _Connection | None = None
        self._key: tuple = ()

    async def __aenter__(self) -> _Response:
        pool = self._pool
        scheme, host, port, path = pool._origin(self._url)
        self._key = (scheme, host, port)
        request = _request_bytes(host, port, scheme, path, self._headers, self._body)
        await pool._slots.acquire()
        try:
            return await self._send(request)
        except BaseException:
            self._release(reuse=False)
            raise

    async def _send(self, request: bytes) -> _Response:
        # A pooled connection the server has just closed fails before any answer: then once more on a new one.
        connection = self._pool._checkout(self._key)
        if connection is not None:
            self._connection = connection
            response = await self._try(connection, request, retry_if_stale=True)
            if response is not None:
                return response
            connection.close()
        self._connection = connection = await self._pool._connect(*self._key, self._connect_timeout)
        return await self._try(connection, request, retry_if_stale=False)

    async def _try(self, connection: _Connection, request: bytes, retry_if_stale: bool) -> _Response | None:
        response = connection.start(request, self._read_timeout)
        try:
            await response.headers_in()
        except ConnectionError:
            if retry_if_stale and not response.started:
                return None
            raise
        return response

    async def __aexit__(self, kind, error, traceback) -> None:
        self._release(reuse=error is None)  # the pool keeps it only if its response was read to the end

    def _release(self, reuse: bool) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            if reuse:
                self._pool._checkin(self._key, connection)
            else:
                connection.close()
        self._pool._slots.release()


def _request_bytes(host: str, port: int, scheme: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """The request's head and body. (Header values come from configuration, checked there for line breaks.)"""
    default_port = 443 if scheme == "https" else 80
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}" if port == default_port else f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "\r\n".join(lines).encode("latin-1") + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.response: _Response | None = None
        self.idle_since = 0.0
        self._lost = False
        self._keep_alive = False

    def reusable(self) -> bool:
        """Open, kept alive by the server, and done with its last response."""
        return (
            not self._lost and self._keep_alive and self._transport is not None and not self._transport.is_closing()
            and (self.response is None or self.response.complete)
        )  # fmt: skip

    def start(self, request: bytes, read_timeout: float) -> _Response:
        self.response = _Response(self, read_timeout)
        self._keep_alive = False
        self._transport.write(request)
        return self.response

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # ---- asyncio.Protocol ----

    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.close()  # nothing was asked: a server talking out of turn
            return
        response.started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            response.fail(ConnectionError(f"malformed response: {error}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        response = self.response
        if response is None or response.complete:
            return
        if response.until_close:  # a body with neither a length nor chunks ends where the connection does
            response.finish()
        else:
            response.fail(ConnectionError("the connection closed before the response ended"))

    def pause(self) -> None:
        self._transport.pause_reading()

    def resume(self) -> None:
        if not self._lost:
            self._transport.resume_reading()

    # ---- httptools callbacks ----

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.raw_headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()
        self.response.headers_complete(self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.response.feed(body)

    def on_message_complete(self) -> None:
        self.response.finish()


class _Response:
    """Status and headers once they are in; the body as it arrives."""

    def __init__(self, connection: _Connection, read_timeout: float):
        self._connection = connection
        self._read_timeout = read_timeout
        self._loop = connection._loop
        self.status = 0  # until the headers are in
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.raw_headers: list[tuple[str, str]] = []
        self.started = False  # a byte of it has arrived
        self.complete = False
        self.until_close = False  # its body ends when the connection closes
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future | None = None

    # ---- the connection's side ----

    def headers_complete(self, status: int) -> None:
        self.status = status
        self.headers = CIMultiDict(self.raw_headers)
        self.until_close = "content-length" not in self.headers and "transfer-encoding" not in self.headers
        self._wake()

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > PAUSE_AT and not self._paused:
            self._paused = True
            self._connection.pause()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: Exception) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- the reader's side ----

    async def headers_in(self) -> None:
        while not self.status:
            await self._wait()

    async def read(self) -> bytes:
        parts = []
        async for chunk in self._body():
            parts.append(chunk)
        return b"".join(parts)

    async def lines(self) -> AsyncIterator[str]:
        pending = b""
        async for chunk in self._body():
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.decode().rstrip("\r")
        if pending:
            yield pending.decode().rstrip("\r")

    async def _body(self) -> AsyncIterator[bytes]:
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < PAUSE_AT // 2:
                    self._paused = False
                    self._connection.resume()
                yield chunk
            if self.complete:
                return
            await self._wait()

    async def _wait(self) -> None:
        """Until the connection has more; ConnectionError once it failed, TimeoutError after `read_timeout`
        without a byte."""
        if self._error is not None:
            raise self._error
        self._waiter = waiter = self._loop.create_future()
        timer = self._loop.call_later(self._read_timeout, _time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._error is not None:
            raise self._error


def _time_out(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no data within the read timeout"))
