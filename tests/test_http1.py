"""The relay's HTTP/1.1 client (gateway/http1.py, through its seam in gateway/upstream.py) against raw TCP
servers started here, for what a well-behaved upstream (tests/upstream.py) never does: drop a pooled
connection, answer HTTP/1.0 style, split a line or a character across packets, stall, send a large body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl

import pytest
import trustme
import uvloop

from gateway.upstream import Http1Client, UpstreamUnavailable

BODY = b'{"model": "m"}'
HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Each test on asyncio's own loop and on uvloop (the gateway's, whose transports and TLS differ)."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


@contextlib.asynccontextmanager
async def _connected(handler, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"):
    """A client, and the base URL of a loopback server running `handler(reader, writer)` per connection."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    client = Http1Client()
    try:
        yield client, f"{'https' if tls else 'http'}://{host}:{server.sockets[0].getsockname()[1]}"
    finally:
        await client.close()
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    return await reader.readexactly(int(lengths[0]))


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def _post(client: Http1Client, url: str, read_timeout: float = 5.0) -> tuple[int, bytes]:
    async with client.post(url + "/v1/chat/completions", BODY, HEADERS, 2.0, read_timeout) as response:
        return response.status, await response.read()


def test_a_pooled_connection_the_server_dropped_is_replaced(run):
    """The server closes a kept-alive connection as the next request arrives on it: that request goes out
    again on a new connection, unseen by the caller."""
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        await _read_request(reader)
        writer.write(_ok(b'{"n": %d}' % len(connections)))
        await writer.drain()
        if len(connections) == 1:
            await _read_request(reader)  # the second request, on the same connection: dropped unanswered
        writer.close()

    async def main():
        async with _connected(handler) as (client, url):
            assert await _post(client, url) == (200, b'{"n": 1}')
            assert await _post(client, url) == (200, b'{"n": 2}')
        assert len(connections) == 2

    run(main())


def test_connections_are_reused(run):
    connections = []

    def handler(reader, writer):
        connections.append(writer)
        return _answer_every_request(reader, writer)

    async def main():
        async with _connected(handler) as (client, url):
            for _ in range(5):
                assert await _post(client, url) == (200, b'{"ok": true}')
        assert len(connections) == 1

    run(main())


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # HTTP/1.0 style: no length, no chunks, the body ends where the connection does
        (b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"old": "style"}', (200, b'{"old": "style"}')),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial"', None),  # cut 90 bytes short
    ],
    ids=["ends-with-the-connection", "cut-mid-body"],
)
def test_a_response_the_server_closes_the_connection_on(run, answer, expected):
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def main():
        async with _connected(handler) as (client, url):
            if expected is not None:
                assert await _post(client, url) == expected
                return
            with pytest.raises(UpstreamUnavailable) as raised:
                await _post(client, url)
            assert not raised.value.timed_out

    run(main())


def test_chunked_lines_split_anywhere(run):
    """SSE lines come out whole, however the chunks cut them, even inside a UTF-8 character."""
    events = [json.dumps({"content": text}, ensure_ascii=False) for text in ("héllo", "wörld", "日本")]
    payload = "".join(f"data: {event}\n\n" for event in events).encode() + b"data: [DONE]\n\n"

    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(payload), 7):  # 7-byte chunks, each sent on its own
            piece = payload[start : start + 7]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def main():
        async with _connected(handler) as (client, url):
            async with client.post(url + "/v1/chat/completions", BODY, HEADERS, 2.0, 5.0) as response:
                lines = [line async for line in response.lines() if line]
        assert lines == [f"data: {event}" for event in events] + ["data: [DONE]"]

    run(main())


def test_a_large_body_arrives_whole(run):
    body = bytes(range(256)) * (24 * 1024)  # 6 MiB: past the point where the client stops reading for a while

    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(_ok(body))
        await writer.drain()

    async def main():
        async with _connected(handler) as (client, url):
            status, whole = await _post(client, url)
        assert status == 200 and whole == body

    run(main())


def test_a_stalled_server_times_out(run):
    async def handler(reader, writer):
        await _read_request(reader)
        await asyncio.sleep(10)

    async def main():
        started = asyncio.get_running_loop().time()
        async with _connected(handler) as (client, url):
            with pytest.raises(UpstreamUnavailable) as raised:
                await _post(client, url, read_timeout=0.3)
        assert raised.value.timed_out
        assert asyncio.get_running_loop().time() - started < 3

    run(main())


def test_nobody_listening_is_unavailable(run):
    async def main():
        async with _connected(_answer_every_request) as (_, url):
            pass  # the server closes here: nothing listens at its URL any more
        client = Http1Client()
        with pytest.raises(UpstreamUnavailable):
            await _post(client, url)
        await client.close()

    run(main())


@pytest.fixture
def tls_server_context(tmp_path, monkeypatch) -> ssl.SSLContext:
    """A server certificate for localhost from a CA that this test's clients trust (through SSL_CERT_FILE,
    which the default TLS context reads when it is made) and no other does."""
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(context)
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    return context


def _answer_every_request(reader, writer):
    async def loop():
        while True:
            try:
                await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(_ok(b'{"ok": true}'))

    return loop()


def test_https_with_a_verified_certificate(tls_server_context, run):
    async def main():
        async with _connected(_answer_every_request, tls_server_context, host="localhost") as (client, url):
            assert await _post(client, url) == (200, b'{"ok": true}')
            assert await _post(client, url) == (200, b'{"ok": true}')  # on the pooled connection

    run(main())


def test_https_refuses_a_certificate_for_another_name(tls_server_context, run):
    """Reached as 127.0.0.1, the server shows a certificate for localhost only: no answer is read."""

    async def main():
        async with _connected(_answer_every_request, tls_server_context, host="127.0.0.1") as (client, url):
            with pytest.raises(UpstreamUnavailable):
                await _post(client, url)

    run(main())
