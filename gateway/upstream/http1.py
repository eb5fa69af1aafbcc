"""A small HTTP/1.1 client for relaying to providers: keep-alive connections on asyncio transports, responses
parsed by httptools (the C parser uvicorn uses). It does what a relay needs and nothing else: POST, a body
read whole or line by line, pooled connections, timeouts, TLS. No redirects or cookies; proxies are
`gateway.upstream`'s business (it sends proxied requests through httpx). Failures are ConnectionError
(OSError) or TimeoutError; `gateway.upstream` maps them.

The rules that keep one client's answer from reaching another, and a provider from exhausting the gateway:
- Interim responses (100 Continue, 103 Early Hints) are skipped; the final one is the answer. A 101 is refused.
- A connection goes back to the pool only at a message boundary: its response complete by its own framing
  (Content-Length, chunked, or never: one that ends with the connection), the request written out, and not
  a byte more received. Bytes after a response close the connection; they are never parsed as the next one.
- A request is sent once: never again after a failure (see `_Exchange.__aenter__`).
- Bounds: a response's head (MAX_HEAD_BYTES, MAX_HEADERS), a body read whole and a line of a body read
  line by line (`Limits`, from settings); beyond them, UnusableResponse, and the connection is dropped.
- It asks for `Accept-Encoding: identity`; a gzip or deflate body is decoded all the same, any other
  Content-Encoding is refused rather than relayed undecoded.

Why not aiohttp's client: the client was most of a relayed request's CPU, and this one takes far less
(docs/design/http1-client.md).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import zlib
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

# An idle connection older than this is closed rather than reused: uvicorn (vLLM) and llama-server close theirs after
# 5 s idle, and a request written as the server's close crosses it is lost (a POST is never resent).
IDLE_KEEP_S = 4.0
# A connection whose response ended less than this ago is not reused yet: llama-server closes the connection after
# each streamed response while its headers say keep-alive, and its close must have arrived before a request is written
# on it (docs/design/http1-client.md).
SETTLE_S = 0.05
PAUSE_AT = 1 << 20  # bytes buffered for a slow reader before the socket stops being read
MAX_HEAD_BYTES = 64 * 1024  # a response's status lines and headers, interim responses included
MAX_HEADERS = 128  # header lines of one response (aiohttp's limit)
INFLATE_PIECE = 1 << 20  # the most a compressed body inflates to in one step (a small chunk can inflate hugely)
DECODABLE = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # Content-Encoding -> zlib's wbits for it


@dataclass(frozen=True)
class Limits:
    """What one response may hold (LLM_UPSTREAM_MAX_BODY_BYTES, LLM_UPSTREAM_MAX_LINE_BYTES)."""

    body_bytes: int = 32 << 20  # a body read whole
    line_bytes: int = 1 << 20  # one line of a body read line by line (an SSE event)


class UnusableResponse(ConnectionError):
    """The response broke the protocol or a limit (too large, a line too long, an encoding not decodable): it
    is dropped with its connection, and the request fails as if the provider were unreachable."""


class ConnectFailed(ConnectionError):
    """No connection could be made: the request never left."""


class ConnectTimedOut(ConnectFailed, TimeoutError):
    """No connection within the connect timeout: the request never left."""


class Pool:
    """Connections to any number of origins, at most `connections` open at once (a request beyond waits)."""

    def __init__(self, connections: int, limits: Limits = Limits()) -> None:
        self._idle: dict[tuple, collections.deque[_Connection]] = collections.defaultdict(collections.deque)
        self._slots = asyncio.Semaphore(connections)
        self._tls: ssl.SSLContext | None = None
        self._origins: dict[str, tuple] = {}
        self.limits = limits

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
        connecting = loop.create_connection(lambda: _Connection(loop, self.limits), host, port, ssl=tls)
        try:
            _, connection = await asyncio.wait_for(connecting, timeout)
        except TimeoutError as error:
            raise ConnectTimedOut(f"no connection within {timeout} s") from error
        except OSError as error:
            raise ConnectFailed(f"{type(error).__name__}: {error}") from error
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _checkout(self, key: tuple) -> _Connection | None:
        """The most recently used idle connection old enough to trust (SETTLE_S) and young enough to reuse
        (IDLE_KEEP_S); younger ones stay in the pool for a later request."""
        idle = self._idle[key]
        now = time.monotonic()
        settling: list[_Connection] = []
        found = None
        while idle and found is None:
            connection = idle.pop()
            if not connection.reusable() or now - connection.idle_since >= IDLE_KEEP_S:
                connection.close()
            elif now - connection.idle_since < SETTLE_S:
                settling.append(connection)
            else:
                found = connection
        idle.extend(reversed(settling))
        return found

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
            connection = pool._checkout(self._key) or await pool._connect(*self._key, self._connect_timeout)
            self._connection = connection
            # Sent once. Once written, a request may have reached the provider, and a POST is not idempotent
            # (RFC 9110 9.2.2): a failure from here on, even on a pooled connection the server closed as the
            # request went out, is the caller's; urllib3, httpx and aiohttp resend no POST either. A pooled
            # connection found closed before the request is written is never used (`_checkout`).
            response = connection.start(request, self._read_timeout)
            await response.headers_in()
            return response
        except BaseException:
            self._release(reuse=False)
            raise

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
    if "Accept-Encoding" not in headers and "accept-encoding" not in headers:
        lines.append("Accept-Encoding: identity")  # an uncompressed answer: relayed without inflating it
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "\r\n".join(lines).encode("latin-1") + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits):
        self._loop = loop
        self.limits = limits
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.response: _Response | None = None
        self.idle_since = 0.0
        self._lost = False
        self._keep_alive = False
        self._interim = False  # the message being parsed is a 1xx, not the answer

    def reusable(self) -> bool:
        """Open, kept alive by the server, done with its last response, and its request written out."""
        transport = self._transport
        return (
            not self._lost and self._keep_alive and transport is not None and not transport.is_closing()
            and (self.response is None or self.response.complete) and not transport.get_write_buffer_size()
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
        if response is None or response.complete:
            self.close()  # nothing was asked, or the answer has ended: a server talking out of turn
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:  # a callback's refusal has failed the response already
            response.fail(ConnectionError(f"malformed response: {error}"))
            self.close()
            return
        if not response.status:  # still in the head: it may not grow without bound
            response.head_bytes += len(data)
            if response.head_bytes > MAX_HEAD_BYTES:
                response.fail(UnusableResponse(f"the response head exceeds {MAX_HEAD_BYTES} bytes"))
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

    def _refuse(self, error: UnusableResponse) -> None:
        """Fail the response with `error` and stop parsing (the connection is closed)."""
        self.response.fail(error)
        raise error

    # ---- httptools callbacks ----

    def on_message_begin(self) -> None:
        if self.response.complete:  # bytes after the answer, in the same packet
            self._refuse(UnusableResponse("bytes after the end of the response"))

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.response.raw_headers
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
        if len(headers) > MAX_HEADERS:
            self._refuse(UnusableResponse(f"the response has more than {MAX_HEADERS} headers"))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                self._refuse(UnusableResponse("the server switched protocols (101)"))
            self._interim = True  # 100 Continue, 102, 103 Early Hints: the answer follows
            self.response.raw_headers.clear()
            return
        self._keep_alive = self._parser.should_keep_alive()
        try:
            self.response.headers_complete(status)
        except UnusableResponse as error:
            self._refuse(error)

    def on_body(self, body: bytes) -> None:
        self.response.feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.response.finish()


class _Response:
    """Status and headers once they are in; the body as it arrives."""

    def __init__(self, connection: _Connection, read_timeout: float):
        self._connection = connection
        self._read_timeout = read_timeout
        self._loop = connection._loop
        self._limits = connection.limits
        self.status = 0  # until the final headers are in
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.raw_headers: list[tuple[str, str]] = []
        self.head_bytes = 0
        self.complete = False
        self.until_close = False  # its body ends when the connection closes
        self._wbits: int | None = None  # its body is compressed: zlib's wbits for it
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future | None = None

    # ---- the connection's side ----

    def headers_complete(self, status: int) -> None:
        headers = self.headers = CIMultiDict(self.raw_headers)
        self.until_close = "content-length" not in headers and "transfer-encoding" not in headers
        if "content-encoding" in headers:
            self._wbits = decoding(headers["content-encoding"])
        self.status = status
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
        """The first failure of an unfinished response is what its reader hears."""
        if self._error is None and not self.complete:
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
        return await read_whole(self._decoded(), self._limits.body_bytes, self.headers.get("content-length"))

    def lines(self) -> AsyncIterator[str]:
        return split_lines(self._decoded(), self._limits.line_bytes)

    def _decoded(self) -> AsyncIterator[bytes]:
        return self._body() if self._wbits is None else inflate(self._body(), self._wbits)

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


# ---- bodies, for every client in gateway.upstream ----------------------------------------------------------


def decoding(content_encoding: str) -> int | None:
    """zlib's wbits for a body sent with this Content-Encoding, None for none; UnusableResponse for one that
    cannot be decoded (relaying it undecoded would hand the client garbage)."""
    name = content_encoding.strip().lower()
    if name in ("", "identity"):
        return None
    if name not in DECODABLE:
        raise UnusableResponse(f"the response's Content-Encoding {content_encoding!r} cannot be decoded")
    return DECODABLE[name]


async def inflate(chunks: AsyncIterator[bytes], wbits: int) -> AsyncIterator[bytes]:
    """A compressed body's chunks decompressed, at most INFLATE_PIECE bytes at a time."""
    decompressor = zlib.decompressobj(wbits)
    try:
        async for chunk in chunks:
            while chunk:
                piece = decompressor.decompress(chunk, INFLATE_PIECE)
                chunk = decompressor.unconsumed_tail
                if piece:
                    yield piece
    except zlib.error as error:
        raise UnusableResponse(f"the compressed body does not decode: {error}") from None
    if not decompressor.eof:
        raise UnusableResponse("the compressed body ends early")


async def read_whole(chunks: AsyncIterator[bytes], limit: int, content_length: str | None) -> bytes:
    """A body read to its end; UnusableResponse, without reading on, once it is known to pass `limit` bytes."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise UnusableResponse(f"the response body ({content_length} bytes) exceeds {limit} bytes")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise UnusableResponse(f"the response body exceeds {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def split_lines(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[str]:
    """A body's lines without their ends, however the chunks cut them (in a UTF-8 character too);
    UnusableResponse for a line longer than `limit` bytes, before it is held whole."""
    unended: list[bytes] = []  # pieces of the line not ended yet
    unended_size = 0
    async for chunk in chunks:
        *ended, rest = chunk.split(b"\n")
        if ended:
            if unended_size + len(chunk) > limit and max(unended_size + len(ended[0]), *map(len, ended)) > limit:
                raise UnusableResponse(f"a line of the response exceeds {limit} bytes")
            if unended:
                ended[0] = b"".join(unended) + ended[0]
                unended, unended_size = [], 0
            for line in ended:
                yield line.decode(errors="replace").rstrip("\r")
        if rest:
            unended.append(rest)
            unended_size += len(rest)
            if unended_size > limit:
                raise UnusableResponse(f"a line of the response exceeds {limit} bytes")
    if unended:
        yield b"".join(unended).decode(errors="replace").rstrip("\r")
