"""The relay's HTTP/1.1 client (gateway/upstream/http1.py, through its seam in gateway/upstream/client.py) against raw
TCP servers started here, for what a well-behaved upstream (tests/upstream.py) never does: drop a pooled
connection, answer HTTP/1.0 style, split a line or a character across packets, stall, send a large body,
send interim responses or bytes after a response, answer before the request is written, send an endless head."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl

import pytest
import uvloop

from gateway.upstream.client import Http1Client, Limits, UpstreamUnavailable
from gateway.upstream.http1 import SETTLE_S

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


async def _settle() -> None:
    """Until an idle connection may be reused (SETTLE_S)."""
    await asyncio.sleep(SETTLE_S * 1.5)


async def _post(client: Http1Client, url: str, read_timeout: float = 5.0) -> tuple[int, bytes]:
    async with client.post(url + "/v1/chat/completions", BODY, HEADERS, 2.0, read_timeout) as response:
        return response.status, await response.read()


def test_a_pooled_connection_the_server_closed_is_replaced(run):
    """The server closes a kept-alive connection while it is idle: the next request goes out on a new one."""
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        await _read_request(reader)
        writer.write(_ok(b'{"n": %d}' % len(connections)))
        await writer.drain()
        writer.close()

    async def main():
        async with _connected(handler) as (client, url):
            assert await _post(client, url) == (200, b'{"n": 1}')
            await asyncio.sleep(0.1)  # idle, as the close arrives
            assert await _post(client, url) == (200, b'{"n": 2}')
        assert len(connections) == 2

    run(main())


def test_a_request_dropped_unanswered_on_a_pooled_connection_is_not_sent_again(run):
    """The server reads the second request on a kept-alive connection and closes it without a word: the
    request may have been processed, so it fails (502) rather than go out again on a new connection."""
    requests = []

    async def handler(reader, writer):
        requests.append(await _read_request(reader))
        writer.write(_ok(b'{"n": 1}'))
        await writer.drain()
        requests.append(await _read_request(reader))
        writer.close()

    async def main():
        async with _connected(handler) as (client, url):
            assert await _post(client, url) == (200, b'{"n": 1}')
            await _settle()
            with pytest.raises(UpstreamUnavailable) as raised:
                await _post(client, url)
        assert raised.value.sent and len(requests) == 2

    run(main())


def test_a_connection_just_answered_is_not_reused_before_the_server_may_close_it(run):
    """As llama-server does after each streamed answer: the server closes the connection right after a complete
    response whose headers say keep-alive. Requests sent back to back must not go out on it before that close."""
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        await _read_request(reader)
        writer.write(_ok(b'{"n": %d}' % len(connections), b"Keep-Alive: timeout=5, max=100\r\n"))
        await writer.drain()
        await asyncio.sleep(0.01)  # the close comes a moment after the answer
        writer.close()

    async def main():
        async with _connected(handler) as (client, url):
            for n in (1, 2, 3):
                assert await _post(client, url) == (200, b'{"n": %d}' % n)
        assert len(connections) == 3

    run(main())


def test_a_connection_that_cannot_be_made_says_nothing_was_sent(run):
    async def main():
        async with _connected(_answer_every_request) as (_, url):
            pass  # the server closes here: nothing listens at its URL any more
        client = Http1Client()
        with pytest.raises(UpstreamUnavailable) as raised:
            await _post(client, url)
        await client.close()
        assert not raised.value.sent

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
                await _settle()
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
        assert raised.value.timed_out and raised.value.sent  # it may be working on it: not to be sent again
        assert asyncio.get_running_loop().time() - started < 3

    run(main())


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


# ---- message boundaries: one request's answer is never another's -------------------------------------------


def _counting(answer_for):
    """A handler that answers the n-th request (from 1, across connections) with `answer_for(n)`, and the
    list of its connections."""
    connections, requests = [], []

    async def handler(reader, writer):
        connections.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                requests.append(await _read_request(reader))
                for part in answer_for(len(requests)):
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.02)
        writer.close()

    return handler, connections


@pytest.mark.parametrize("packets", ["apart", "together"])
def test_interim_responses_are_skipped(run, packets):
    """100 Continue and 103 Early Hints come before the answer, in packets of their own or with it; the
    connection carries the next request's answer to the next request."""
    interim = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"]

    def answer_for(n):
        parts = [*interim, _ok(b'{"n": %d}' % n, b"X-Final: yes\r\n")]
        return parts if packets == "apart" else [b"".join(parts)]

    handler, connections = _counting(answer_for)

    async def main():
        async with _connected(handler) as (client, url):
            for n in (1, 2, 3):
                async with client.post(url + "/v1/chat/completions", BODY, HEADERS, 2.0, 5.0) as response:
                    assert (response.status, await response.read()) == (200, b'{"n": %d}' % n)
                    assert response.headers["x-final"] == "yes" and "link" not in response.headers
                await _settle()
        assert len(connections) == 1

    run(main())


@pytest.mark.parametrize("when", ["same-packet", "later"])
def test_bytes_after_a_response_close_its_connection(run, when):
    """Whatever follows a complete response, with it or after it, is never read as the next answer."""

    def answer_for(n):
        answer, extra = _ok(b'{"n": %d}' % n), _ok(b'{"smuggled": true}')
        return [answer + extra] if when == "same-packet" else [answer, extra]

    handler, connections = _counting(answer_for)

    async def main():
        async with _connected(handler) as (client, url):
            assert await _post(client, url) == (200, b'{"n": 1}')
            await asyncio.sleep(0.1)
            assert await _post(client, url) == (200, b'{"n": 2}')
        assert len(connections) == 2

    run(main())


def test_a_response_before_the_request_was_written_closes_its_connection(run):
    """The server answers without reading a large request body: that connection is not at a boundary."""
    body = b"x" * (32 << 20)
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(_ok(b'{"early": true}'))
        await writer.drain()
        await asyncio.sleep(5)  # a request queued behind the unsent body would wait this long for nothing
        writer.close()

    async def main():
        async with _connected(handler) as (client, url):
            async with client.post(url + "/v1/chat/completions", body, HEADERS, 2.0, 10.0) as response:
                assert await response.read() == b'{"early": true}'
            started = asyncio.get_running_loop().time()
            async with client.post(url + "/v1/chat/completions", BODY, HEADERS, 2.0, 10.0) as response:
                assert await response.read() == b'{"early": true}'
            assert asyncio.get_running_loop().time() - started < 2.5  # sent at once, on a new connection
        assert len(connections) == 2

    run(main())


def test_a_response_left_unread_closes_its_connection(run):
    """The reader leaves before the body has ended: the rest of it must not meet the next request."""

    def answer_for(n):
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        return [head + b'7\r\n{"n": %d\r\n' % n, b"1\r\n}\r\n0\r\n\r\n"]

    handler, connections = _counting(answer_for)

    async def main():
        async with _connected(handler) as (client, url):
            async with client.post(url + "/v1/chat/completions", BODY, HEADERS, 2.0, 5.0) as response:
                assert response.status == 200  # and gone, the body unread
            assert await _post(client, url) == (200, b'{"n": 2}')
        assert len(connections) == 2

    run(main())


@pytest.mark.parametrize(
    ("head", "refusal"),
    [
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", "101"),
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (256 * 1024), "head"),  # a header without end
        (b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 1000 + b"Content-Length: 0\r\n\r\n", "headers"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 10000, "head"),  # interim responses without end
    ],
    ids=["switching-protocols", "huge-header", "many-headers", "endless-interim"],
)
def test_a_response_head_is_refused(run, head, refusal):
    """A 101 (no other protocol is spoken here), a head past MAX_HEAD_BYTES, or past MAX_HEADERS fields."""
    handler, _ = _counting(lambda n: [head])

    async def main():
        async with _connected(handler) as (client, url):
            with pytest.raises(UpstreamUnavailable, match=refusal):
                await _post(client, url)

    run(main())


def test_lines_are_bounded(run):
    handler, _ = _counting(lambda n: [_ok(b"data: " + b"x" * 5000 + b"\n\n")])

    async def main():
        async with _connected(handler) as (_, url):
            client = Http1Client(Limits(line_bytes=4096))
            try:
                with pytest.raises(UpstreamUnavailable, match="line"):
                    async with client.post(url + "/v1/chat/completions", BODY, HEADERS, 2.0, 5.0) as response:
                        [line async for line in response.lines()]
            finally:
                await client.close()

    run(main())
